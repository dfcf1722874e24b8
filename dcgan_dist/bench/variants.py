"""The step variants of `python -m dcgan_dist.bench` and how each one is timed.

A `Variant` is a name and a `build()` that returns the step function (its state in the closure):
the pytorch/examples reference (`reference.py`), and ours in NCHW or channels_last, fp32 or bf16,
eager, compiled or captured as one CUDA graph. `measure()` builds every variant, then times them
interleaved, each inside its own time-box; a variant's figures (img/s per repeat, peak memory,
FLOPs per step) stay on it, and `Variant.rate` / `.tflops()` are the one median the table and the
JSON report.
"""

from __future__ import annotations

import contextlib
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

from dcgan_dist.bench.reference import reference_discriminator, reference_generator, reference_step
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.step import compile_models, gan_step, make_optimizers
from dcgan_dist.util import first_line

PRESET = "pytorch-examples"  # the reference's architecture, in our code


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


def _why(error: BaseException) -> str:
    """A failed row's reason: the exception's type and first line, short enough for a table cell."""
    return f"{type(error).__name__}: {first_line(error)[:80]}"


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
        variant.error = _why(error)
        variant.step, variant.state = None, ()
    variant.spent_s = time.perf_counter() - start
    print(f"  built {variant.name} in {variant.spent_s:.1f} s", file=sys.stderr, flush=True)


def timed_block(variant: Variant, device: torch.device, steps: int, batch: int, budget_s: float, deadline: float) -> None:
    """One timed block of `steps` steps, unless the variant's budget (or the bench's) cannot hold it."""
    own_left, total_left = budget_s - variant.spent_s, deadline - time.perf_counter()
    left = min(own_left, total_left)
    estimate = (statistics.median(batch * steps / rate for rate in variant.img_per_s) if variant.img_per_s
                else variant.step_s * steps)
    done = len(variant.img_per_s)
    which = f"its {budget_s:g} s budget" if own_left <= total_left else "the bench's total budget"

    def stop(first_block_why: str) -> None:
        variant.skipped = f"{done} repeats in {which}" if done else first_block_why
        variant.step = None

    if estimate > left:
        stop(f"{steps} steps take ~{estimate:.1f} s, past {which} after {variant.spent_s:.0f} s of build + warm-up")
        return
    synchronize(device)
    start = time.perf_counter()
    try:
        with time_box(left), PeakMemory(device) as memory:
            for _ in range(steps):
                variant.step()
            synchronize(device)
    except BudgetExceeded:
        stop(f"its first {steps} timed steps ran past {which}")
        return
    except Exception as error:
        variant.error, variant.step = _why(error), None
        return
    finally:
        variant.spent_s += time.perf_counter() - start
    variant.img_per_s.append(steps * batch / (time.perf_counter() - start))
    variant.peak_bytes = max(variant.peak_bytes, memory.rise + variant.state_bytes)


def measure(table: list[Variant], device: torch.device, steps: int, repeats: int, warmup: int, batch: int,
            image_size: int, reals: list[torch.Tensor], budget_s: float = math.inf, total_budget_s: float = math.inf,
            on_progress: Callable[[], None] = lambda: None) -> None:
    """Build every variant and time its first block right away (a slow build after it, such as a
    cold torch.compile, cannot then leave it no time), then time the other repeats interleaved. A
    variant gets `budget_s` for its build, warm-up and timed steps, and never more than is left of
    `total_budget_s`."""
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
        if variant.step is not None and repeats > 0:
            timed_block(variant, device, steps, batch, budget_s, deadline)
        on_progress()
    print(f"  repeat 1/{repeats} done (each variant's right after its build)", file=sys.stderr, flush=True)

    for repeat in range(1, repeats):
        for variant in table:
            if variant.step is not None:
                timed_block(variant, device, steps, batch, budget_s, deadline)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
        on_progress()
    for variant in table:
        if variant.img_per_s and variant.state and not _finite(variant.state):
            variant.error = "non-finite weights after the timed steps"
        variant.step, variant.state = None, ()  # free the variant's memory
