"""The reader against the decoder alone (issue 16): img/s of `torchvision.io.decode_jpeg` on one
thread next to training's whole reader (`shards bench`'s measure: `open_batches` with one
DataLoader process, `--sampling epochs`, shuffle, decode, batching, scaling) on JPEG shards and
on raw shards of the same images. Prints the machine and one table.

    PYTHONPATH=$PWD python benchmarks/reader_rates.py [--images 8000] [--seconds 8] [--batch 64]

The images are data_throughput.py's synthetic photo-like 64 px JPEGs, packed by the real packer
(`folder` source, quality 95) into local shards of 1000; raw in groups of 64. A DataLoader
process runs torch with one thread, so the decoder row is one thread too.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from data_throughput import synthetic_jpegs  # this folder is on sys.path when run as a script
from torchvision.io import decode_jpeg

from dcgan_dist.data import manifest, pack, tar, throughput


def machine() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2|amx[a-z_]*", cpuinfo)))
    return [f"CPU: {model.group(1) if model else platform.processor()}, {os.cpu_count()} cores; flags: {' '.join(flags)}",
            f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"numpy {np.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]


def decoder_rate(jpegs: list[torch.Tensor], seconds: float) -> float:
    """decode_jpeg alone, one thread, over the packed JPEGs (already tensors), repeated."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for jpeg in jpegs:
                decode_jpeg(jpeg)
            count += len(jpegs)
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def packed_jpegs(url: str) -> list[torch.Tensor]:
    shards = manifest.read(url)
    jpegs = []
    for shard_url in shards.shard_urls:
        with open(shard_url, "rb") as shard:
            jpegs += [torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8) for sample in tar.samples(shard, shard_url)]
    return jpegs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=8.0, help="time per row")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print("\n".join(machine()))
    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(synthetic_jpegs(args.images, 64)):
            Path(folder, "images", f"{i:06d}.jpg").parent.mkdir(exist_ok=True)
            Path(folder, "images", f"{i:06d}.jpg").write_bytes(data)
        urls = {image_format: pack.pack("folder", f"{folder}/images", f"{folder}/{image_format}", 64, image_format,
                                        shard_size=1000, workers=2, progress=False)["manifest"]
                for image_format in ("jpeg", "raw")}
        jpegs, rows = packed_jpegs(urls["jpeg"]), []
        for image_format in ("jpeg", "raw"):
            for loader_workers in (1, 0):
                # the decoder alone right before each reader row: on a shared machine the load moves
                alone = decoder_rate(jpegs, args.seconds / 2)
                rows.append(("torchvision.io.decode_jpeg alone, 1 thread", alone, "just before the next row"))
                cfg = throughput.reader_config(urls[image_format], loader_workers, args.batch, "epochs", 1000, 64)
                rate = throughput.measure(cfg, args.seconds)["img_s"]
                where = "1 loader process" if loader_workers else "in the training process (--loader-workers 0)"
                rows.append((f"reader, {image_format}, {where}", rate, f"{rate / alone:.0%} of decode_jpeg alone"))
    print(f"\n{args.images} images, 64 px, batch {args.batch}, --sampling epochs, --shuffle-buffer 1000, {args.seconds:g} s a row\n")
    print("| measurement | img/s per loader process | note |\n|---|---:|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:,.0f} | {note} |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
