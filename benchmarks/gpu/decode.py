"""The input side of a GPU run: JPEG decode on the GPU against the machine's CPU cores.

    python benchmarks/gpu/decode.py --device cuda --images 4096 --target-img-per-s 50000
    python benchmarks/gpu/decode.py --device cpu            # CPU rows only; GPU rows say "no CUDA"

The images are the bundled digits at --image-size px as JPEG (quality 95, as the shard packer
writes them), held in memory as encoded bytes. Rows: torchvision's decode_jpeg on one core (one
process, one torch thread), on every core (a process per core, each decoding its share), and on
the GPU (`decode_jpeg(list_of_tensors, device="cuda")`, a batch per call, nvJPEG). The last row
says how many loader processes (at the one-core rate) keep up with --target-img-per-s (part a's
best step). Decode only: a training reader also reads tar shards and scales to [-1, 1], so it
needs somewhat more.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import time

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg

JPEG_QUALITY = 95  # dcgan_dist.data.pack.FORMATS["jpeg"]
ENCODED: list[torch.Tensor] = []  # the JPEGs, set before the pool forks so workers inherit them


def make_jpegs(count: int, image_size: int) -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits().images  # 1797 8x8 images, 0..16
    jpegs = []
    for i in range(count):
        pixels = (digits[i % len(digits)] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels).convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        jpegs.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    return jpegs


def decode_share(args: tuple[int, int, int]) -> int:
    """A worker's share: images start::step of ENCODED, `rounds` times over, one thread."""
    start, step, rounds = args
    torch.set_num_threads(1)
    count = 0
    for _ in range(rounds):
        for jpeg in ENCODED[start::step]:
            decode_jpeg(jpeg)
            count += 1
    return count


def cpu_one_core(min_seconds: float) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_share((0, 1, 1))  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            count += decode_share((0, 1, 1))
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def cpu_all_cores(processes: int, rounds: int) -> float:
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(decode_share, [(i, processes, 1) for i in range(processes)])  # warm-up: workers started
        start = time.perf_counter()
        count = sum(pool.map(decode_share, [(i, processes, rounds) for i in range(processes)]))
        return count / (time.perf_counter() - start)


def gpu_batched(batch: int, min_seconds: float) -> float:
    batches = [ENCODED[i:i + batch] for i in range(0, len(ENCODED) - batch + 1, batch)] or [ENCODED]
    decode_jpeg(batches[0], device="cuda")  # warm-up: nvJPEG handles, allocations
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for chunk in batches:
            decode_jpeg(chunk, device="cuda")
            count += len(chunk)
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=4096, help="JPEGs made and decoded per round")
    parser.add_argument("--batch-sizes", default="128,1024", help="GPU decode batches (comma-separated)")
    parser.add_argument("--seconds", type=float, default=2.0, help="least time per timed row")
    parser.add_argument("--target-img-per-s", type=float, default=0.0, help="the step's img/s the loaders must feed")
    args = parser.parse_args(argv)

    ENCODED[:] = make_jpegs(args.images, args.image_size)
    cores = len(os.sched_getaffinity(0))
    mean_kib = sum(len(j) for j in ENCODED) / len(ENCODED) / 1024
    rows = []
    one_core = cpu_one_core(args.seconds)
    rows.append(("CPU decode_jpeg, 1 core (1 process, 1 thread)", f"{one_core:,.0f}", ""))
    rounds = max(1, math.ceil(one_core * args.seconds / args.images))
    all_cores = cpu_all_cores(cores, rounds)
    rows.append((f"CPU decode_jpeg, all {cores} cores ({cores} processes)", f"{all_cores:,.0f}",
                 f"{all_cores / one_core:.1f}x one core"))
    gpu_best = 0.0
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        name = f"GPU decode_jpeg(list, device='cuda'), batch {batch}"
        if args.device != "cuda" or not torch.cuda.is_available():
            rows.append((name, "no CUDA", ""))
            continue
        try:
            rate = gpu_batched(batch, args.seconds)
        except RuntimeError as error:  # an nvJPEG this torchvision lacks, say
            rows.append((name, f"failed: {str(error).splitlines()[0][:80]}", ""))
            continue
        gpu_best = max(gpu_best, rate)
        rows.append((name, f"{rate:,.0f}", f"{rate / all_cores:.1f}x all CPU cores"))
    if args.target_img_per_s:
        needed = math.ceil(args.target_img_per_s / one_core)
        rows.append((f"loader processes to feed {args.target_img_per_s:,.0f} img/s (part a's best step)", str(needed),
                     f"at the 1-core rate; this machine has {cores} cores" + ("" if needed <= cores else ": too few, decode on the GPU")))

    print(f"JPEG decode, {args.images} digits at {args.image_size} px (quality {JPEG_QUALITY}, {mean_kib:.1f} KiB each), "
          f"torch {torch.__version__}\n")
    print("| decoder | img/s | note |\n|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    figures = f"CPU {one_core:,.0f} img/s per core, {all_cores:,.0f} on {cores} cores"
    figures += f"; GPU {gpu_best:,.0f} img/s" if gpu_best else "; GPU: no CUDA"
    if args.target_img_per_s:
        figures += f"; {needed} loader processes for {args.target_img_per_s:,.0f} img/s"
    print(f"\nfigures {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
