"""The speed settings (--precision, --channels-last, --compile) and the benchmark's command line."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dcgan_dist.bench.__main__ as bench_cli
from dcgan_dist import config
from dcgan_dist.bench import machine, variants
from dcgan_dist.checkpoint import unwrap
from dcgan_dist.loop import wrap_models
from dcgan_dist.models import build_models
from dcgan_dist.sync_bn import GlobalBatchNorm2d


def test_speed_flags_parse_and_bad_values_exit_2(capsys):
    cfg = config.parse(["--precision", "bf16", "--no-channels-last", "--compile", "reduce-overhead"])
    assert (cfg.perf.precision, cfg.perf.channels_last, cfg.perf.compile) == ("bf16", False, "reduce-overhead")
    defaults = config.parse([])
    assert (defaults.perf.precision, defaults.perf.channels_last, defaults.perf.compile) == ("fp32", True, "off")
    assert config.flatten(cfg)["perf.precision"] == "bf16"  # an MLflow param and a Tune key
    with pytest.raises(SystemExit) as exit_info:
        config.parse(["--precision", "fp16"])
    assert exit_info.value.code == 2
    assert "--precision" in capsys.readouterr().err


def ddp(model: torch.nn.Module, parallel_strategy_kwargs: dict) -> torch.nn.Module:
    """What Ray Train's prepare_model does on a CPU worker of a multi-worker run (it needs a Ray
    Train worker to ask for its world size): DistributedDataParallel with the loop's options."""
    return DistributedDataParallel(model, **parallel_strategy_kwargs)


def test_the_loop_syncs_bn_and_sets_the_layout_then_wraps_ddp_then_compiles(tmp_path):
    """The loop's own wrapping (wrap_models, which setup calls): GlobalBatchNorm2d and channels_last
    on the plain modules, DDP around them (no buffer broadcast), torch.compile around DDP (G, D,
    and D's local module for G's pass on its own); checkpoints keep the plain parameter names
    through all of it."""
    generator, discriminator = build_models("pytorch-examples", 32, "paper")
    names = set(generator.state_dict())
    cfg = config.parse(["--bn-sync", "--compile", "default"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g_run, d_run, d_local = wrap_models(generator, discriminator, cfg, torch.device("cpu"), prepare_model=ddp)
        for compiled in (g_run, d_run):
            assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # compiled on first call
            assert isinstance(compiled._orig_mod, DistributedDataParallel) and not compiled._orig_mod.broadcast_buffers
            plain = compiled._orig_mod.module
            assert any(isinstance(m, GlobalBatchNorm2d) for m in plain.modules())
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
        assert isinstance(d_local, torch._dynamo.eval_frame.OptimizedModule) and d_local._orig_mod is d_run._orig_mod.module
        assert unwrap(g_run) is g_run._orig_mod.module and unwrap(d_local) is unwrap(d_run)
        assert set(unwrap(g_run).state_dict()) == names

        plain_cfg = config.parse(["--no-channels-last"])  # --compile off, per-worker BatchNorm
        generator, discriminator = build_models("pytorch-examples", 32, "paper")
        g_ddp, d_ddp, d_local = wrap_models(generator, discriminator, plain_cfg, torch.device("cpu"), prepare_model=ddp)
        assert isinstance(g_ddp, DistributedDataParallel) and g_ddp.module is generator and d_local is discriminator
        assert not any(isinstance(m, GlobalBatchNorm2d) for m in generator.modules())
        assert generator.blocks[0].weight.is_contiguous() and unwrap(g_ddp) is generator
    finally:
        dist.destroy_process_group()


def table_cells(stdout: str) -> list[list[str]]:
    """The bench table's rows (header first), each as its stripped cells."""
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]


@pytest.mark.slow
def test_bench_prints_one_table_with_ratios_against_the_reference(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.bench", "--device", "cpu", "--image-size", "32", "--batch-size", "8",
         "--steps", "1", "--repeats", "2", "--warmup", "1", "--variants", "reference", "NCHW", "channels_last", "autocast",
         "--output-json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = table_cells(result.stdout)
    assert rows[0] == ["variant", "img/s", "vs reference", "peak memory", "GFLOP/step", "TFLOP/s"]
    assert all(len(row) == 6 for row in rows), rows
    names = [row[0] for row in rows[1:]]
    assert names == ["reference (pytorch/examples)", "ours fp32, NCHW", "ours fp32, channels_last", "ours bf16 autocast"]
    emulated = machine.bf16_emulation(torch.device("cpu"))
    for cells in rows[1:] if not emulated else rows[1:-1]:
        assert float(cells[1].replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d\dx", cells[2])
        assert cells[3].endswith("MiB")
    if emulated:  # an AVX2-only CPU: a row that says why, not minutes of emulated bf16
        assert rows[-1][1] == f"skipped: {emulated}" and rows[-1][2:] == [""] * 4
    assert rows[1][2] == "1.00x"
    assert "AMD" in result.stdout or "Intel" in result.stdout or "avx" in result.stdout  # the CPU and its flags
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [v["name"] for v in report["variants"]] == names
    assert report["variants"][2]["train_compile"] == "off"
    assert report["variants"][0]["status"] == "ok" and report["variants"][0]["vs_reference"] == 1.0


def test_bf16_variants_are_skipped_with_a_reason_where_bf16_is_emulated(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "bf16_emulation", lambda device: "bf16 is emulated on this CPU (no avx512_bf16/amx_bf16)")
    start = time.perf_counter()
    bench_cli.main(["--device", "cpu", "--image-size", "32", "--batch-size", "4", "--steps", "1", "--repeats", "1",
                "--variants", "bf16"])
    assert time.perf_counter() - start < 30  # nothing emulated ran
    rows = table_cells(capsys.readouterr().out)
    assert [row[0] for row in rows[1:]] == ["ours bf16 autocast", "ours bf16, compile"]
    for row in rows[1:]:
        assert row == [row[0], "skipped: bf16 is emulated on this CPU (no avx512_bf16/amx_bf16)", "", "", "", ""]


def test_every_variant_is_time_boxed_and_every_row_has_every_cell():
    """A build past its budget is stopped by the alarm, a slow step stops after the repeats that
    fit, a broken build is a failed row; a fast variant beside them takes all its repeats."""
    device, image_size, batch = torch.device("cpu"), 32, 4
    reals = [torch.rand(batch, 3, image_size, image_size) * 2 - 1]
    budget_s = 2.5

    def hangs():
        time.sleep(60)

    def slow_step():
        return (lambda: time.sleep(0.4)), ()

    def breaks():
        raise RuntimeError("no such kernel\nsecond line")

    table = [variants.Variant("fast step", lambda: ((lambda: None), ())),
             variants.Variant("hangs in its build", lambda: hangs()),
             variants.Variant("slow step", slow_step),
             variants.Variant("breaks", breaks)]
    start = time.perf_counter()
    variants.measure(table, device, steps=2, repeats=5, warmup=1, batch=batch, image_size=image_size, reals=reals,
                  budget_s=budget_s)
    assert time.perf_counter() - start < 30
    fast, hung, slow, broken = table
    assert fast.status == "ok" and len(fast.img_per_s) == 5
    assert hung.status == "skipped" and "ran past its 2.5 s budget" in hung.skipped and hung.spent_s < budget_s + 1
    # warm-up 0.4 s, then blocks of 0.8 s: two fit in 2.5 s, the third would not
    assert slow.status == "ok" and len(slow.img_per_s) == 2 and slow.skipped == "2 repeats in its 2.5 s budget"
    assert slow.spent_s < budget_s
    assert broken.status == "failed" and broken.error == "RuntimeError: no such kernel"

    rows = bench_cli.table_rows(table, batch)
    assert all(len(row) == len(bench_cli.header(None)) == 6 for row in rows)
    assert rows[0][2] == "n/a"  # no reference step in this table: its ratios would be against another variant
    assert rows[1][1].startswith("skipped: build + 1 warm-up steps ran past")
    assert rows[2][0] == "slow step (2 repeats in its 2.5 s budget)" and float(rows[2][1]) == pytest.approx(10, rel=0.2)  # 4 images per 0.4 s
    assert rows[3][1] == "failed: RuntimeError: no such kernel" and rows[3][2:] == [""] * 4
    assert len(bench_cli.table_rows(table, batch, peak_tflops=989.0)[3]) == 7  # CUDA adds the share of the bf16 peak


@pytest.mark.slow
def test_bench_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal cannot be shown here")
    result = subprocess.run([sys.executable, "-m", "dcgan_dist.bench", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
