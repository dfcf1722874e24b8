"""How cheap is an exact resume with `--sampling epochs`? Time to the first batch of a reader
started at step 0 and of one started late in the epoch (which passes over what was handed out
without decoding it), next to the time of reading the whole epoch and of planning it.

    python benchmarks/epoch_resume.py [--shards 20] [--shard-size 500] [--batch 64]

One rank, one stream in-process (--loader-workers 0), local JPEG shards of 32 px in a temporary
folder: the reader's own work, no DataLoader processes or network.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import webdataset as wds
from PIL import Image

from dcgan_dist.data import epochs, manifest, pack, split, stream


def write(folder: str, shards: int, shard_size: int) -> manifest.Manifest:
    records = []
    for index in range(shards):
        with wds.TarWriter(f"{folder}/{pack.shard_name(index)}") as sink:
            for i in range(shard_size):
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), (i % 255, index % 255, 90)).save(buffer, format="JPEG")
                sink.write({"__key__": f"{index:04d}{i:06d}", "jpg": buffer.getvalue()})
        records.append({"url": pack.shard_name(index), "num_samples": shard_size})
    url = f"{folder}/manifest.json"
    manifest.write(url, manifest.Manifest(url, "bench", 32, "jpeg", records), "bench")
    return manifest.read(url)


def first_batch_s(shards: manifest.Manifest, batch: int, buffer: int, step: int, count: int = 1) -> float:
    reader = epochs.EpochBatches(shards, batch, 0, 1, 0, 0, step, 0, buffer, 0)
    batches = stream.ShardBatches(shards, batch, 0, 1, 0, loader_workers=0, epochs=reader)
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards = write(folder, args.shards, args.shard_size)
        steps = split.steps_per_epoch(shards.num_samples, args.batch)
        print(f"{shards.num_samples} samples in {args.shards} shards of {args.shard_size}, batch {args.batch}: {steps} steps per epoch\n")
        print(f"| shuffle buffer | plan one stream (s) | whole epoch (s) | first batch at step 0 (s) | first batch at step {steps // 2} (s) "
              f"| first batch at step {steps - 1} (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for buffer in (0, 1000, 10000):
            started = time.perf_counter()
            plan = split.stream([s["num_samples"] for s in shards.shards], 0, 0, args.batch, buffer, [split.Segment(0, 1, 1)], 0, 0)
            split.reading_order(plan.num_samples, buffer, 0, 0, 0, 0)
            plan_s = time.perf_counter() - started
            row = [plan_s, first_batch_s(shards, args.batch, buffer, 0, steps)]
            row += [first_batch_s(shards, args.batch, buffer, step) for step in (0, steps // 2, steps - 1)]
            print(f"| {buffer} | " + " | ".join(f"{value:.3f}" for value in row) + " |")


if __name__ == "__main__":
    main()
