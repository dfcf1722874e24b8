"""`python -m dcgan_dist.bench`: how fast one DCGAN training step is, against the reference.

Builds the pytorch/examples DCGAN step (`reference.py`) and our step in several variants, all at
the same image size and batch, then times them interleaved: each repeat runs every variant for
`--steps` steps in turn, so a slow spell of a shared machine hits all of them alike, and the table
reports each variant's median over the repeats. One table, one process:

    variant | img/s | vs reference | peak memory

Peak memory is the CUDA allocator's high-water mark over the variant's timed steps on a GPU, and on
a CPU the rise of the process's resident set (VmHWM, reset before each timed block) over what it
held before, plus the variant's own weights, gradients and Adam state.

Every variant is time-boxed (`--variant-budget-s`): its build and warm-up run under an alarm,
and a timed repeat it cannot finish inside what is left of its budget is not started, so a variant
that would take minutes (a slow compile, bf16 emulated on a CPU without avx512_bf16/amx_bf16) gets
a row that says why it stopped instead of holding the table up. bf16 variants are skipped outright
where bf16 is emulated (`--run-emulated-bf16` runs them anyway). On CUDA the table adds each
variant's share of the chip's dense bf16 peak (`--peak-tflops`, or a known-peaks table), and
`--output-json` writes the figures for scripts (benchmarks/gpu/check.sh picks its train settings
from them).

`--extras` adds the numbers around the step: a short full training run (Ray Train + WebDataset
shards + MLflow) against the bare step of the same config, MLflow's logging cost as a share of the
step, and the data pipeline's decode rate per core.

    python -m dcgan_dist.bench --device cpu                       # the table, 64 px, batch 128
    python -m dcgan_dist.bench --device cuda --batch-size 1024    # a batch that fills an H100
    python -m dcgan_dist.bench --device cpu --extras              # plus the full-run figures
    python -m dcgan_dist.bench --device cuda --output-json bench.json --variant-budget-s 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcgan_dist.bench_machine import bf16_emulation, bf16_peak_tflops, describe_machine, matmul_tflops
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.reference import reference_discriminator, reference_generator, reference_step
from dcgan_dist.step import compile_models, gan_step, make_optimizers

PRESET = "pytorch-examples"  # the reference's architecture, in our code
REAL_BATCHES = 4  # real batches rotated through, so no variant reads one cached tensor


@dataclass
class Variant:
    """A named way to take a step: `build` returns the step function (state in its closure)."""

    name: str
    build: Callable[[], Callable[[], None]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    precision: str = "fp32"
    # the training flag `--compile` that computes this step with --precision above; None where no
    # training setting does (the whole-step CUDA graph, the NCHW layout, the reference)
    train_compile: str | None = None
    # filled while measuring
    step: Callable[[], None] | None = None
    state: tuple = ()
    flops_per_step: int = 0  # counted on the eager step this variant computes
    state_bytes: int = 0
    img_per_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str = ""  # it broke: the first line of the exception
    skipped: str = ""  # it did not run (or stopped early): why
    spent_s: float = 0.0  # build, warm-up and timed steps so far, against its budget
    step_s: float = 0.0  # one warm-up step's time: the estimate for a timed block

    @property
    def status(self) -> str:
        return "failed" if self.error else "ok" if self.img_per_s else "skipped"

    @property
    def rate(self) -> float | None:
        """The median img/s over the timed repeats (None unless it ran cleanly)."""
        return statistics.median(self.img_per_s) if self.status == "ok" else None

    def tflops(self, batch: int) -> float | None:
        return self.rate * self.flops_per_step / batch / 1e12 if self.rate else None


# ---------------------------------------------------------------- the variants


def _state_bytes(*objects) -> int:
    """Bytes of the parameters, gradients and optimizer state a step keeps between calls."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            total += sum(p.numel() * p.element_size() * 2 for p in obj.parameters())  # weight + grad
            total += sum(b.numel() * b.element_size() for b in obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            total += sum(t.numel() * t.element_size() for s in obj.state.values() for t in s.values() if torch.is_tensor(t))
    return total


def reference_variant(device: torch.device, image_size: int, batch: int, reals: list[torch.Tensor]):
    torch.manual_seed(0)
    generator, discriminator = reference_generator(image_size).to(device), reference_discriminator(image_size).to(device)
    # as shipped: torch's default Adam implementation for the device
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    counter = iter(range(1 << 62))

    def step() -> None:
        reference_step(generator, discriminator, opt_g, opt_d, reals[next(counter) % len(reals)])

    return step, (generator, discriminator, opt_g, opt_d)


def ours_variant(device: torch.device, image_size: int, batch: int, reals: list[torch.Tensor], *,
                 channels_last: bool, precision: str = "fp32", compile_mode: str | None = None):
    torch.manual_seed(0)
    generator, discriminator = build_models(PRESET, image_size, "paper")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator, discriminator = (m.to(device, memory_format=memory_format) for m in (generator, discriminator))
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    # compiled as training compiles them (G, D, and D's local module for G's pass)
    g_run, d_run, d_local = compile_models(generator, discriminator, compile_mode or "off")
    images = [real.contiguous(memory_format=memory_format) for real in reals]
    counter = iter(range(1 << 62))

    def step() -> None:
        if compile_mode is not None:
            torch.compiler.cudagraph_mark_step_begin()  # as the training loop marks each step
        z = sample_latent(batch, PRESET, device)
        gan_step(g_run, d_run, opt_g, opt_d, images[next(counter) % len(images)], z, precision, d_local)

    return step, (generator, discriminator, opt_g, opt_d)


def cuda_graph_variant(device: torch.device, image_size: int, batch: int, reals: list[torch.Tensor], *,
                       precision: str):
    """The whole step (both forward and backward passes and both Adam updates) captured once as a
    CUDA graph and replayed: one launch per step instead of hundreds. Adam runs with capturable=True
    so its step count lives on the GPU; z is drawn inside the graph (replays advance the RNG)."""
    torch.manual_seed(0)
    generator, discriminator = build_models(PRESET, image_size, "paper")
    generator, discriminator = (m.to(device, memory_format=torch.channels_last) for m in (generator, discriminator))
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    static_real = reals[0].contiguous(memory_format=torch.channels_last).clone()

    def body() -> None:
        # gan_step's autocast blocks open and close inside the capture, so the bf16 weight casts
        # are captured too and replays re-cast the updated weights
        gan_step(generator, discriminator, opt_g, opt_d, static_real, sample_latent(batch, PRESET, device), precision)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    counter = iter(range(1 << 62))

    def step() -> None:
        static_real.copy_(reals[next(counter) % len(reals)])
        graph.replay()

    return step, (generator, discriminator, opt_g, opt_d)


def variants(device: torch.device, image_size: int, batch: int, reals: list[torch.Tensor], names: list[str] | None) -> list[Variant]:
    args = (device, image_size, batch, reals)
    table = [
        Variant("reference (pytorch/examples)", lambda: reference_variant(*args)),
        Variant("ours fp32, NCHW", lambda: ours_variant(*args, channels_last=False)),
        Variant("ours fp32, channels_last", lambda: ours_variant(*args, channels_last=True), train_compile="off"),
        Variant("ours fp32, compile", lambda: ours_variant(*args, channels_last=True, compile_mode="default"),
                train_compile="default"),
        Variant("ours bf16 autocast", lambda: ours_variant(*args, channels_last=True, precision="bf16"),
                precision="bf16", train_compile="off"),
        Variant("ours bf16, compile", lambda: ours_variant(*args, channels_last=True, precision="bf16", compile_mode="default"),
                precision="bf16", train_compile="default"),
        Variant("ours bf16, CUDA graph", lambda: cuda_graph_variant(*args, precision="bf16"), devices=("cuda",),
                precision="bf16"),
        Variant("ours bf16, compile reduce-overhead", lambda: ours_variant(*args, channels_last=True, precision="bf16",
                                                                         compile_mode="reduce-overhead"), devices=("cuda",),
                precision="bf16", train_compile="reduce-overhead"),
    ]
    chosen = [v for v in table if device.type in v.devices]
    if names:
        chosen = [v for v in chosen if any(name in v.name for name in names)]
    return chosen


# ---------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """The high-water mark of memory over a block: CUDA's allocator on a GPU, resident set on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
            self.before = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.rise = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.rise = _proc_status_kib("VmHWM") * 1024 - self.before
        return False


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class BudgetExceeded(BaseException):
    """A variant's time is up. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` inside torch.compile or a variant's set-up swallows it."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise BudgetExceeded in this (main) thread once `seconds` have passed: Python runs the
    alarm's handler between two torch operations, so a long step stops within one operation.
    Off the main thread no alarm can be set, and the block runs to its end."""
    if seconds <= 0:
        raise BudgetExceeded
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def count_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one step (convolutions and matrix products, forward and
    backward), counted by torch's FlopCounterMode on an eager step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:80]}"


def _finite(state: tuple) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in state if isinstance(m, torch.nn.Module) for p in m.parameters())


def build_variant(variant: Variant, device: torch.device, warmup: int, budget_s: float) -> None:
    """Build the variant and take its warm-up steps (compiles, autotuning, allocator) inside its
    budget; the last warm-up step's time is the estimate for a timed block."""
    start = time.perf_counter()
    try:
        with time_box(budget_s):
            variant.step, variant.state = variant.build()
            for _ in range(warmup):
                step_start = time.perf_counter()
                variant.step()
                synchronize(device)
                variant.step_s = time.perf_counter() - step_start
            variant.state_bytes = _state_bytes(*variant.state)
    except BudgetExceeded:
        variant.skipped = f"build + {warmup} warm-up steps ran past its {budget_s:g} s budget"
        variant.step, variant.state = None, ()
    except Exception as error:  # a variant this machine cannot run is reported, not fatal
        variant.error = _first_line(error)
        variant.step, variant.state = None, ()
    variant.spent_s = time.perf_counter() - start
    print(f"  built {variant.name} in {variant.spent_s:.1f} s", file=sys.stderr, flush=True)


def timed_block(variant: Variant, device: torch.device, steps: int, batch: int, budget_s: float, deadline: float) -> None:
    """One timed block of `steps` steps, unless the variant's budget (or the bench's) cannot hold it."""
    left = min(budget_s - variant.spent_s, deadline - time.perf_counter())
    estimate = (statistics.median(batch * steps / rate for rate in variant.img_per_s) if variant.img_per_s
                else variant.step_s * steps)
    done = len(variant.img_per_s)

    def stop(first_block_why: str) -> None:
        variant.skipped = f"{done} repeats in its {budget_s:g} s budget" if done else first_block_why
        variant.step = None

    if estimate > left:
        stop(f"{steps} steps take ~{estimate:.1f} s, past its {budget_s:g} s budget after {variant.spent_s:.0f} s of build + warm-up")
        return
    synchronize(device)
    start = time.perf_counter()
    try:
        with time_box(left), PeakMemory(device) as memory:
            for _ in range(steps):
                variant.step()
            synchronize(device)
    except BudgetExceeded:
        stop(f"its first {steps} timed steps ran past its {budget_s:g} s budget")
        return
    except Exception as error:
        variant.error, variant.step = _first_line(error), None
        return
    finally:
        variant.spent_s += time.perf_counter() - start
    variant.img_per_s.append(steps * batch / (time.perf_counter() - start))
    variant.peak_bytes = max(variant.peak_bytes, memory.rise + variant.state_bytes)


def measure(table: list[Variant], device: torch.device, steps: int, repeats: int, warmup: int, batch: int,
            image_size: int, reals: list[torch.Tensor], budget_s: float = math.inf, total_budget_s: float = math.inf,
            on_progress: Callable[[], None] = lambda: None) -> None:
    """Build every variant, then time them interleaved. A variant gets `budget_s` for its build,
    warm-up and timed steps, and never more than is left of `total_budget_s`."""
    deadline = time.perf_counter() + total_budget_s
    # FLOPs are a property of the algorithm: count them once on each eager version.
    eager = [v for v in table if not v.skipped]
    reference_flops = count_flops(reference_variant(device, image_size, batch, reals)[0]) if eager else 0
    ours_flops = count_flops(ours_variant(device, image_size, batch, reals, channels_last=False)[0]) if eager else 0
    for variant in table:
        variant.flops_per_step = reference_flops if variant.name.startswith("reference") else ours_flops
        if variant.skipped:
            continue
        left = min(budget_s, deadline - time.perf_counter())
        if left <= 0:
            variant.skipped = f"the bench's total budget ({total_budget_s:.0f} s) was spent"
            continue
        build_variant(variant, device, warmup, left)
        on_progress()

    for repeat in range(repeats):
        for variant in table:
            if variant.step is not None:
                timed_block(variant, device, steps, batch, budget_s, deadline)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
        on_progress()
    for variant in table:
        if variant.img_per_s and variant.state and not _finite(variant.state):
            variant.error = "non-finite weights after the timed steps"
        variant.step, variant.state = None, ()  # free the variant's memory


# ---------------------------------------------------------------- reporting


def header(peak_tflops: float | None) -> list[str]:
    cells = ["variant", "img/s", "vs reference", "peak memory", "GFLOP/step", "TFLOP/s"]
    return cells + ["share of bf16 peak"] if peak_tflops else cells


def table_rows(table: list[Variant], batch: int, peak_tflops: float | None = None) -> list[list[str]]:
    """The table's rows as cells, every one as wide as the header."""
    width = len(header(peak_tflops))
    reference = table[0].rate if table else None
    rows = []
    for variant in table:
        if variant.status != "ok":
            why = f"failed: {variant.error}" if variant.error else f"skipped: {variant.skipped}"
            rows.append([variant.name, why] + [""] * (width - 2))
            continue
        rate, tflops = variant.rate, variant.tflops(batch)
        name = variant.name + (f" ({variant.skipped})" if variant.skipped else "")
        cells = [name, f"{rate:,.0f}", f"{rate / reference:.2f}x" if reference else "n/a",
                 f"{variant.peak_bytes / 2**20:,.0f} MiB", f"{variant.flops_per_step / 1e9:,.0f}", f"{tflops:,.2f}"]
        if peak_tflops:
            cells.append(f"{tflops / peak_tflops:.1%}")
        rows.append(cells)
    return rows


def print_table(table: list[Variant], batch: int, peak_tflops: float | None = None) -> None:
    cells = header(peak_tflops)
    print("| " + " | ".join(cells) + " |")
    print("|---|" + "---:|" * (len(cells) - 1))
    for row in table_rows(table, batch, peak_tflops):
        print("| " + " | ".join(row) + " |")


def write_json(path: str, args: argparse.Namespace, table: list[Variant], machine: str, peak_tflops: float | None,
               matmul: float | None) -> None:
    """The figures for scripts: every variant with its status, and the training settings it
    stands for (precision, train_compile), so a caller can pick the fastest that works."""
    reference = table[0].rate if table else None
    variants = []
    for v in table:
        rate = v.rate
        variants.append({
            "name": v.name, "status": v.status, "why": v.error or v.skipped, "precision": v.precision,
            "train_compile": v.train_compile, "img_per_s": rate, "img_per_s_repeats": v.img_per_s,
            "vs_reference": rate / reference if rate and reference else None,
            "peak_mib": v.peak_bytes / 2**20 if rate else None, "gflop_per_step": v.flops_per_step / 1e9,
            "tflops": v.tflops(args.batch_size),
            "spent_s": round(v.spent_s, 2),
        })
    report = {"device": args.device, "machine": machine, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "variant_budget_s": args.variant_budget_s, "bf16_peak_tflops": peak_tflops, "matmul_bf16_tflops": matmul,
              "variants": variants}
    partial = Path(path).with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(path)  # a reader (or a kill) sees the last whole report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per repeat (default: 2 on CPU, 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table shows each variant's median")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--variants", nargs="*", help="only variants whose name contains one of these words")
    parser.add_argument("--variant-budget-s", type=float, default=None,
                        help="seconds each variant may take: build, warm-up and timed steps (default: 180 on CPU, 120 on CUDA)")
    parser.add_argument("--total-budget-s", type=float, default=math.inf, help="seconds for all variants together (default: no limit)")
    parser.add_argument("--run-emulated-bf16", action="store_true", help="time the bf16 variants even where bf16 is emulated (slow)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak for the share column (CUDA)")
    parser.add_argument("--output-json", metavar="FILE", help="also write the figures as JSON (rewritten as they come in)")
    parser.add_argument("--extras", action="store_true", help="also time a full training run, MLflow logging and the data pipeline")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch_size < 2:
        parser.error("--batch-size: must be at least 2 (BatchNorm needs a batch)")
    cuda = args.device == "cuda"
    args.steps = args.steps or (50 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.variant_budget_s = args.variant_budget_s or (120.0 if cuda else 180.0)
    if args.variant_budget_s <= 0 or args.total_budget_s <= 0:
        parser.error("--variant-budget-s and --total-budget-s: must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does: pick the fastest conv kernels
    machine = describe_machine(device)
    peak, peak_source = bf16_peak_tflops(device, args.peak_tflops)
    matmul = matmul_tflops(device) if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(1)
    reals = [(torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator) * 2 - 1).to(device)
             for _ in range(REAL_BATCHES)]
    table = variants(device, args.image_size, args.batch_size, reals, args.variants)
    emulated = bf16_emulation(device)
    if emulated and not args.run_emulated_bf16:
        for variant in table:
            if variant.precision == "bf16":
                variant.skipped = emulated
    report = (lambda: write_json(args.output_json, args, table, machine, peak, matmul)) if args.output_json else (lambda: None)
    measure(table, device, args.steps, args.repeats, args.warmup, args.batch_size, args.image_size, reals,
            args.variant_budget_s, args.total_budget_s, on_progress=report)
    report()
    print(f"\nDCGAN step, {args.image_size} px, batch {args.batch_size}, {args.device}: {machine}")
    print(f"median of {args.repeats} interleaved repeats of {args.steps} steps each; each variant time-boxed to "
          f"{args.variant_budget_s:.0f} s (build + warm-up + steps)")
    if emulated:
        print(f"{emulated}{': its variants ran anyway (--run-emulated-bf16)' if args.run_emulated_bf16 else ''}")
    if device.type == "cuda":
        print(f"bf16 peak: {f'{peak:,.0f} TFLOP/s ({peak_source})' if peak else peak_source}; "
              f"an 8192^3 bf16 matmul here: {matmul:,.0f} TFLOP/s")
    print()
    print_table(table, args.batch_size, peak)
    if args.extras:
        from dcgan_dist import bench_extras

        bench_extras.main(args, table)


if __name__ == "__main__":
    main()
