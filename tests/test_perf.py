"""The speed settings (--precision, --channels-last, --compile) and the benchmark's command line."""

import re
import subprocess
import sys

import pytest
import torch

from dcgan_dist import config
from dcgan_dist.checkpoint import unwrap
from dcgan_dist.loop import compile_models, speed_up
from dcgan_dist.models import build_models


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


def test_layout_and_compile_wrap_ddp_and_unwrap_sees_through_both(tmp_path):
    """channels_last before DDP, torch.compile after it (G, D, and D's local module for G's
    pass); checkpoints keep the plain parameter names through both wrappers."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    generator, discriminator = build_models("pytorch-examples", 32, "paper")
    names = set(generator.state_dict())
    fast = speed_up(generator, config.PerfConfig(channels_last=True), torch.device("cpu"))
    assert generator.blocks[0].weight.is_contiguous(memory_format=torch.channels_last)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g_ddp, d_ddp = DistributedDataParallel(fast), DistributedDataParallel(discriminator)
        g_run, d_run, d_local = compile_models(g_ddp, d_ddp, "default")
        assert g_run is not g_ddp and d_local is not discriminator  # compile wrappers (compiled on first call)
        assert unwrap(g_run) is generator and unwrap(d_run) is discriminator and unwrap(d_local) is discriminator
        assert set(unwrap(g_run).state_dict()) == names
        assert compile_models(g_ddp, d_ddp, "off") == (g_ddp, d_ddp, discriminator)
    finally:
        dist.destroy_process_group()

    plain = speed_up(build_models("pytorch-examples", 32, "paper")[0], config.PerfConfig(channels_last=False), torch.device("cpu"))
    assert unwrap(plain) is plain and plain.blocks[0].weight.is_contiguous()


def test_bench_prints_one_table_with_ratios_against_the_reference():
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.bench", "--device", "cpu", "--image-size", "32", "--batch-size", "8",
         "--steps", "1", "--repeats", "2", "--warmup", "1", "--variants", "reference", "NCHW", "channels_last", "autocast"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| variant | img/s | vs reference | peak memory |")
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == ["reference (pytorch/examples)", "ours fp32, NCHW", "ours fp32, channels_last", "ours bf16 autocast"]
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert float(cells[1].replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d\dx", cells[2])
        assert cells[3].endswith("MiB")
    assert rows[1].split("|")[3].strip() == "1.00x"


def test_bench_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal cannot be shown here")
    result = subprocess.run([sys.executable, "-m", "dcgan_dist.bench", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
