"""The reader against the decoder alone (issue 16): img/s of `torchvision.io.decode_jpeg` on one
thread next to training's whole reader (`open_batches` with one DataLoader process, as `shards
bench` times it: `--sampling epochs`, shuffle, decode, batching, the handover, scaling) on JPEG
shards (one JPEG per tar member, as WebDataset writes them, and grouped: `--group-size 64`) and
on raw shards of the same images. Prints the machine and one table, with each loader process's
images per CPU second it used and the share of the machine's CPU time the hypervisor took for
other guests ("stolen", from /proc/stat) while the rows ran.

    PYTHONPATH=$PWD python benchmarks/reader_rates.py [--images 8000] [--rounds 8] [--block 1.5] [--batch 64]

The images are data_throughput.py's synthetic photo-like 64 px JPEGs, packed by the real packer
(`folder` source, quality 95) into local shards of 1000; raw and grouped JPEGs in groups of 64.
A DataLoader process runs torch with one thread, so the decoder rows are one thread too.

Every reader is open at once, and all are timed in the same rounds of alternating blocks (per
round and reader: the decoder one by one, the reader, the decoder in lists), so each ratio (a
reader's images per second over the decoder's, across all of its blocks) compares runs seconds
apart: on a shared virtual machine the speed of a core drifts by 20-30 % within a minute
(measured), more than the differences measured here. While the others run, a reader is paused
(its loader process idles once its prefetched batches are ready); after each pause the
prefetched batches are taken before the clock starts, so a block counts only what was read during it.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from data_throughput import synthetic_jpegs  # this folder is on sys.path when run as a script
from torchvision.io import decode_jpeg

from dcgan_dist.bench.machine import describe_machine
from dcgan_dist.data import manifest, open_batches, pack, tar, throughput


def machine() -> list[str]:
    return [f"CPU: {os.cpu_count()} cores, {describe_machine(torch.device('cpu'))}",
            f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"numpy {np.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]


def steal_ticks() -> tuple[int, int]:
    """(ticks stolen by the hypervisor, all ticks) of all cores so far, from /proc/stat."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return ticks[7], sum(ticks[:8])


def decode_one_by_one(jpegs: list[torch.Tensor], batch: int) -> None:
    for jpeg in jpegs:
        decode_jpeg(jpeg)


def decode_in_lists(jpegs: list[torch.Tensor], batch: int) -> None:
    """One `decode_jpeg(list)` call per batch, as the reader decodes."""
    for i in range(0, len(jpegs), batch):
        decode_jpeg(jpegs[i:i + batch])


def decoder_block(decode, jpegs: list[torch.Tensor], batch: int, seconds: float) -> tuple[int, float]:
    """(images, seconds) of the decoder alone on one thread over the packed JPEGs (already tensors), repeated."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode(jpegs, batch)
        count += len(jpegs)
    return count, time.perf_counter() - start


def reader_block(batches, prefetched: int, seconds: float, pids: list[int]) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds of its loader processes `pids`) the reader delivers in a
    block, after taking what it prefetched while paused."""
    for _ in range(prefetched):
        next(batches)
    count, start, cpu_start = 0, time.perf_counter(), throughput.loader_cpu_seconds(pids)
    while time.perf_counter() - start < seconds:
        count += len(next(batches))
    return count, time.perf_counter() - start, throughput.loader_cpu_seconds(pids) - cpu_start


def interleaved(readers: dict[str, object], jpegs: list[torch.Tensor], batch: int, rounds: int, block: float) -> dict[str, dict]:
    """Per reader (name: its config), the img/s of the reader and of each way of decoding alone
    timed beside it, in the same rounds of alternating blocks for all readers."""
    opened = {}
    for name, cfg in readers.items():
        before = set(throughput.child_pids())
        batches = open_batches(cfg, rank=0, world_size=1, device=torch.device("cpu"))
        next(batches)  # starts the loader process and opens the first shards
        prefetched = (cfg.data.prefetch_batches + 1) * max(cfg.data.loader_workers, 1)  # the DataLoader's prefetch_factor and the batch in hand
        opened[name] = (batches, prefetched, sorted(set(throughput.child_pids()) - before))
    totals = {name: {"reader": [0, 0.0], "one by one": [0, 0.0], "in lists": [0, 0.0], "loader cpu": 0.0} for name in readers}
    steal_start = steal_ticks()
    for _ in range(rounds):
        for name, (batches, prefetched, pids) in opened.items():
            for part, result in (("one by one", decoder_block(decode_one_by_one, jpegs, batch, block / 2)),
                                 ("reader", reader_block(batches, prefetched, block, pids)),
                                 ("in lists", decoder_block(decode_in_lists, jpegs, batch, block / 2))):
                totals[name][part][0] += result[0]
                totals[name][part][1] += result[1]
                totals[name]["loader cpu"] += result[2] if part == "reader" and pids else 0.0
    stolen, ticks = (end - start for end, start in zip(steal_ticks(), steal_start))
    opened.clear()  # stops the loader processes
    batches = None
    rates = {}
    for name, parts in totals.items():
        rates[name] = {part: images / seconds for part, (images, seconds) in ((p, parts[p]) for p in ("reader", "one by one", "in lists"))}
        # a loader process's rate per CPU second it got: what it does with a core of its own, however
        # busy the training process or the neighbours keep the machine (none with 0 loader processes)
        rates[name]["per loader cpu s"] = parts["reader"][0] / parts["loader cpu"] if parts["loader cpu"] > 0 else float("nan")
    return {"rows": rates, "steal": stolen / max(ticks, 1)}


def packed_jpegs(url: str) -> list[torch.Tensor]:
    shards = manifest.read(url)
    jpegs = []
    for shard_url in shards.shard_urls:
        with open(shard_url, "rb") as shard:
            jpegs += [torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8) for sample in tar.samples(shard, shard_url)]
    return jpegs


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=8, help="alternating blocks of the decoder and the reader")
    parser.add_argument("--block", type=float, default=1.5, help="seconds of the reader per block (the decoder: as long)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader process; the training process scales on one thread too (throughput.measure)
    print("\n".join(machine()))
    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(synthetic_jpegs(args.images, 64)):
            Path(folder, "images", f"{i:06d}.jpg").parent.mkdir(exist_ok=True)
            Path(folder, "images", f"{i:06d}.jpg").write_bytes(data)
        urls = {image_format: pack.pack("folder", f"{folder}/images", f"{folder}/{image_format}", 64, image_format,
                                        shard_size=1000, workers=2, progress=False)["manifest"]
                for image_format in ("jpeg", "raw")}
        urls["grouped jpeg"] = pack.pack("folder", f"{folder}/images", f"{folder}/grouped", 64, "jpeg", shard_size=1000,
                                         workers=2, progress=False, group_size=64)["manifest"]
        readers = {f"{image_format}, {where}": throughput.reader_config(urls[image_format], loader_workers, args.batch, "epochs", 1000, 64)
                   for loader_workers, where in ((1, "1 loader process"), (0, "in the training process (--loader-workers 0)"))
                   for image_format in ("jpeg", "grouped jpeg", "raw")}
        measured = interleaved(readers, packed_jpegs(urls["jpeg"]), args.batch, args.rounds, args.block)
    print(f"\n{args.images} images, 64 px, batch {args.batch}, --sampling epochs, --shuffle-buffer 1000, "
          f"{args.rounds} rounds of alternating blocks of {args.block:g} s; CPU stolen by the hypervisor meanwhile: {measured['steal']:.0%}\n")
    print("| reader | img/s | per loader CPU second | decode_jpeg alone, one by one | ratio | decode_jpeg(list) alone | ratio |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, rates in measured["rows"].items():
        reader, one, lists = rates["reader"], rates["one by one"], rates["in lists"]
        per_cpu = "" if math.isnan(rates["per loader cpu s"]) else f"{rates['per loader cpu s']:,.0f}"  # NaN: no loader process
        decoders = f"{one:,.0f} | {reader / one:.0%} | {lists:,.0f} | {reader / lists:.0%}" if not name.startswith("raw") else " | | | "
        print(f"| {name} | {reader:,.0f} | {per_cpu} | {decoders} |")  # raw rows: no decoder to compare with
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
