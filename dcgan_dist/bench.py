"""`python -m dcgan_dist.bench`: how fast one DCGAN training step is, against the reference.

Builds the pytorch/examples DCGAN step (`reference.py`) and our step in several variants, all at
the same image size and batch, then times them interleaved: each repeat runs every variant for
`--steps` steps in turn, so a slow spell of a shared machine hits all of them alike, and the table
reports each variant's median over the repeats. One table, one process:

    variant | img/s | vs reference | peak memory

Peak memory is the CUDA allocator's high-water mark over the variant's timed steps on a GPU, and on
a CPU the rise of the process's resident set (VmHWM, reset before each timed block) over what it
held before, plus the variant's own weights, gradients and Adam state.

`--extras` adds the numbers around the step: a short full training run (Ray Train + WebDataset
shards + MLflow) against the bare step of the same config, MLflow's logging cost as a share of the
step, and the data pipeline's decode rate per core.

    python -m dcgan_dist.bench --device cpu                       # the table, 64 px, batch 128
    python -m dcgan_dist.bench --device cuda --batch-size 1024    # a batch that fills an H100
    python -m dcgan_dist.bench --device cpu --extras              # plus the full-run figures
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.reference import reference_discriminator, reference_generator, reference_step
from dcgan_dist.step import gan_step, make_optimizers

PRESET = "pytorch-examples"  # the reference's architecture, in our code
REAL_BATCHES = 4  # real batches rotated through, so no variant reads one cached tensor


@dataclass
class Variant:
    """A named way to take a step: `build` returns the step function (state in its closure)."""

    name: str
    build: Callable[[], Callable[[], None]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    # filled while measuring
    step: Callable[[], None] | None = None
    flops_per_step: int = 0  # counted on the eager step this variant computes
    state_bytes: int = 0
    img_per_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str = ""


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
    g_run, d_run = generator, discriminator
    if compile_mode is not None:
        g_run, d_run = torch.compile(generator, mode=compile_mode), torch.compile(discriminator, mode=compile_mode)
    images = [real.contiguous(memory_format=memory_format) for real in reals]
    counter = iter(range(1 << 62))

    def step() -> None:
        z = sample_latent(batch, PRESET, device)
        gan_step(g_run, d_run, opt_g, opt_d, images[next(counter) % len(images)], z, precision)

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
        Variant("ours fp32, channels_last", lambda: ours_variant(*args, channels_last=True)),
        Variant("ours fp32, compile", lambda: ours_variant(*args, channels_last=True, compile_mode="default")),
        Variant("ours bf16 autocast", lambda: ours_variant(*args, channels_last=True, precision="bf16")),
        Variant("ours bf16, compile", lambda: ours_variant(*args, channels_last=True, precision="bf16", compile_mode="default")),
        Variant("ours bf16, CUDA graph", lambda: cuda_graph_variant(*args, precision="bf16"), devices=("cuda",)),
        Variant("ours bf16, compile reduce-overhead", lambda: ours_variant(*args, channels_last=True, precision="bf16",
                                                                         compile_mode="reduce-overhead"), devices=("cuda",)),
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


def count_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one step (convolutions and matrix products, forward and
    backward), counted by torch's FlopCounterMode on an eager step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def measure(table: list[Variant], device: torch.device, steps: int, repeats: int, warmup: int, batch: int,
            image_size: int, reals: list[torch.Tensor]) -> None:
    # FLOPs are a property of the algorithm: count them once on each eager version.
    reference_flops = count_flops(reference_variant(device, image_size, batch, reals)[0])
    ours_flops = count_flops(ours_variant(device, image_size, batch, reals, channels_last=False)[0])
    for variant in table:
        variant.flops_per_step = reference_flops if variant.name.startswith("reference") else ours_flops
        start = time.perf_counter()
        try:
            variant.step, state = variant.build()
            for _ in range(warmup):  # compiles, autotunes, allocator warm-up
                variant.step()
            synchronize(device)
            variant.state_bytes = _state_bytes(*state)
        except Exception as error:  # a variant this machine cannot run is reported, not fatal
            variant.error = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
            variant.step = None
        print(f"  built {variant.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    for repeat in range(repeats):
        for variant in table:
            if variant.step is None:
                continue
            synchronize(device)
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                for _ in range(steps):
                    variant.step()
                synchronize(device)
                elapsed = time.perf_counter() - start
            variant.img_per_s.append(steps * batch / elapsed)
            variant.peak_bytes = max(variant.peak_bytes, memory.rise + variant.state_bytes)
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)


def print_table(table: list[Variant], batch: int) -> None:
    reference = statistics.median(table[0].img_per_s) if table and table[0].img_per_s else None
    print("| variant | img/s | vs reference | peak memory | GFLOP/step | TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in table:
        if variant.error:
            print(f"| {variant.name} | failed: {variant.error} | | |")
            continue
        rate = statistics.median(variant.img_per_s)
        ratio = f"{rate / reference:.2f}x" if reference else "n/a"
        flops_per_image = variant.flops_per_step / batch
        print(f"| {variant.name} | {rate:,.0f} | {ratio} | {variant.peak_bytes / 2**20:,.0f} MiB "
              f"| {variant.flops_per_step / 1e9:,.0f} | {rate * flops_per_image / 1e12:,.2f} |")


def describe_machine(device: torch.device) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per repeat (default: 2 on CPU, 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table shows each variant's median")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--variants", nargs="*", help="only variants whose name contains one of these words")
    parser.add_argument("--extras", action="store_true", help="also time a full training run, MLflow logging and the data pipeline")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch_size < 2:
        parser.error("--batch-size: must be at least 2 (BatchNorm needs a batch)")
    cuda = args.device == "cuda"
    args.steps = args.steps or (50 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does: pick the fastest conv kernels
    generator = torch.Generator().manual_seed(1)
    reals = [(torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator) * 2 - 1).to(device)
             for _ in range(REAL_BATCHES)]
    table = variants(device, args.image_size, args.batch_size, reals, args.variants)
    measure(table, device, args.steps, args.repeats, args.warmup, args.batch_size, args.image_size, reals)
    print(f"\nDCGAN step, {args.image_size} px, batch {args.batch_size}, {args.device}: {describe_machine(device)}")
    print(f"median of {args.repeats} interleaved repeats of {args.steps} steps each\n")
    print_table(table, args.batch_size)
    if args.extras:
        from dcgan_dist import bench_extras

        bench_extras.main(args, table)


if __name__ == "__main__":
    main()
