"""The epoch plan at scale: time and peak memory of planning a whole epoch (`--sampling epochs`)
for 1,024 ranks x 8 loader workers over 3 M samples in 3,000 shards, of the plan after two
resizes in one epoch (1,000 -> 1,024 ranks, then back to 1,000 at mid-epoch), of one loader
worker's stream after them (what each resumed reader computes), and, with --plan-cli, of
`shards plan --resume-step` on tar shards of that size.

    python benchmarks/epoch_plan_scale.py [--ranks 1024] [--loader-workers 8] [--shards 3000] [--shard-size 1000]
                                          [--batch-size 4096] [--shuffle-buffer 1000] [--plan-cli DIR]

The plan is pure (split.py needs the manifest's sample counts only), so the synthetic manifest is
counts. Each measurement runs in a fresh process (this script with --child): the time, then the
same again under tracemalloc (its peak: Python and numpy allocations) and the process's RSS peak
above its RSS after the imports (getrusage). --plan-cli DIR writes the shards there (members of
0 bytes: the plan reads tar headers only, 1.5 GB for 3 M samples; kept there, for a rerun), then
times the CLI with its output to /dev/null.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import astuple
from pathlib import Path

MIB = 2**20


def rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(what: str, args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    from dcgan_dist.data import split

    counts = [args.shard_size] * args.shards
    steps = split.steps_per_epoch(sum(counts), args.batch_size)
    smaller = args.ranks * 125 // 128  # 1,000 of 1,024
    resized = [split.Segment(0, smaller, args.loader_workers), split.Segment(steps // 4, args.ranks, args.loader_workers),
               split.Segment(steps // 2, smaller, args.loader_workers)]
    runs = {
        "full": lambda: split.streams(counts, 0, 0, args.batch_size, args.shuffle_buffer, [split.Segment(0, args.ranks, args.loader_workers)]),
        "resized": lambda: split.streams(counts, 0, 0, args.batch_size, args.shuffle_buffer, resized),
        "one": lambda: [split.stream(counts, 0, 0, args.batch_size, args.shuffle_buffer, resized, smaller // 2, args.loader_workers - 1)],
    }
    before = rss_now()
    started = time.perf_counter()
    plans = runs[what]()
    seconds = time.perf_counter() - started
    rss_peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    streams, pieces = len(plans), sum(len(plan.pieces) for plan in plans)
    del plans
    tracemalloc.start()
    runs[what]()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "streams": streams, "pieces": pieces, "traced_mib": traced_peak / MIB, "rss_mib": rss_peak / MIB,
            "steps": steps, "resized": [list(astuple(segment)) for segment in resized]}


def tar_header(name: bytes) -> bytes:
    """A ustar header of an empty regular file `name` (checksum included)."""
    fields = name.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2 + b"00000000000\0" * 2 + b" " * 8 + b"0" + b"\0" * 100 \
        + b"ustar\x0000" + b"\0" * 247
    checksum = b"%06o\0 " % sum(fields)
    return fields[:148] + checksum + fields[156:]


def write_shards(folder: Path, shards: int, shard_size: int) -> str:
    from dcgan_dist.data import manifest, pack

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(shards):
        path = folder / pack.shard_name(index)
        if not path.exists():
            path.write_bytes(b"".join(tar_header(b"%04d%06d.jpg" % (index, i)) for i in range(shard_size)) + b"\0" * 1024)
        records.append({"url": pack.shard_name(index), "num_samples": shard_size})
    url = str(folder / "manifest.json")
    manifest.write(url, manifest.Manifest(url, "bench", 64, "jpeg", records), "bench")
    return url


def plan_cli(args: argparse.Namespace, steps: int, *flags: str) -> dict:
    url = write_shards(Path(args.plan_cli), args.shards, args.shard_size)
    command = [sys.executable, "-m", "dcgan_dist.shards", "plan", url, "--world-size", str(args.ranks * 125 // 128),
               "--loader-workers", str(args.loader_workers), "--batch-size", str(args.batch_size),
               "--shuffle-buffer", str(args.shuffle_buffer), "--resume-step", str(steps // 2), "--from-world-size", str(args.ranks), *flags]
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        process = subprocess.Popen(command, stdout=devnull, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix in the others)
    seconds, summary = time.perf_counter() - started, process.stderr.read().strip().splitlines()
    if status:
        raise RuntimeError(f"{' '.join(command)} failed: {summary}")
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024, "summary": summary[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4096, help="the global batch (default: 4096, 4 per rank)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--plan-cli", metavar="DIR", help="also write tar shards of that size to DIR and time `shards plan` on them")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("ranks", "loader_workers", "shards", "shard_size",
                                                                              "batch_size", "shuffle_buffer")]
    results = {}
    for what in ("full", "resized", "one"):
        child = subprocess.run([sys.executable, __file__, *flags, "--child", what], capture_output=True, text=True, check=True)
        results[what] = json.loads(child.stdout.strip().splitlines()[-1])
    steps, resized = results["full"]["steps"], results["full"]["resized"]
    print(f"{args.shards * args.shard_size:,} samples in {args.shards:,} shards, global batch {args.batch_size:,}: {steps} steps; "
          f"shuffle buffer {args.shuffle_buffer:,}; resizes (from_step, ranks, loader workers): {resized}\n")
    print("| plan | streams | pieces | time (s) | tracemalloc peak (MiB) | RSS peak over the imports (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"full": f"whole epoch, {args.ranks:,} x {args.loader_workers}", "resized": "whole epoch after both resizes (the last segment)",
             "one": "one loader worker's stream after both"}
    for what, row in results.items():
        print(f"| {names[what]} | {row['streams']:,} | {row['pieces']:,} | {row['seconds']:.3f} | {row['traced_mib']:.0f} | {row['rss_mib']:.0f} |")
    if args.plan_cli:
        for flags in ((), ("--pieces",)):  # the keys (every tar header read), or the pieces (the manifest alone)
            cli = plan_cli(args, steps, *flags)
            print(f"\n`shards plan --resume-step {steps // 2}{' --pieces' if flags else ''}` ({args.ranks:,} -> {args.ranks * 125 // 128:,} "
                  f"ranks): {cli['seconds']:.1f} s, max RSS {cli['rss_mib']:.0f} MiB; {cli['summary']}")


if __name__ == "__main__":
    main()
