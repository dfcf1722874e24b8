"""Packing at size: images/s and peak memory of `shards pack` from an LSUN-layout lmdb and from a
folder of image files, at two counts, to show memory does not grow with the images' bytes.

    python benchmarks/packing.py [--counts 10000 100000] [--workers 1 2] [--work-dir DIR]

Synthetic data: distinct smooth-noise 96x72 JPEGs (LSUN's layout: lmdb key -> encoded image; the
folder: the same bytes as files, 1,000 per sub-folder), packed to 64 px JPEG shards of 1,000.
Each pack runs in a fresh process (this script with --child), which reports its own time and
getrusage peaks (its own RSS and the largest pack worker's); this process samples the whole
tree's PSS (shared pages counted once) every 0.2 s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import psutil
from PIL import Image

MIB = 2**20


def synthetic_jpegs(count: int, seed: int = 0):
    """`count` distinct 96x72 JPEGs (3-4 KB: over half an lmdb page, so stored apart from the keys, as LSUN's 20-40 KB
    WebPs are): 12x9 random colours upsampled bicubically (photo-like, smooth)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((96, 72), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        yield buffer.getvalue()


def build(root: Path, count: int) -> tuple[Path, Path, int]:
    """An lmdb and a folder of `count` images each under `root`; returns them and the images' bytes."""
    lmdb_path, folder = root / f"lmdb-{count}", root / f"folder-{count}"
    root.mkdir(parents=True, exist_ok=True)
    if (root / f"built-{count}").exists():
        return lmdb_path, folder, int((root / f"built-{count}").read_text())
    env = lmdb.open(str(lmdb_path), map_size=count * 16384 + 2**26)
    total = 0
    txn = env.begin(write=True)
    for i, data in enumerate(synthetic_jpegs(count)):
        key = f"{i * 7919 % 10**9:09d}{i:031x}".encode()  # 40 bytes like LSUN's hex keys, not in write order
        txn.put(key, data)
        (folder / f"{i // 1000:04d}").mkdir(parents=True, exist_ok=True)
        (folder / f"{i // 1000:04d}" / f"{i:07d}.jpg").write_bytes(data)
        total += len(data)
        if i % 10000 == 9999:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    (root / f"built-{count}").write_text(str(total))
    return lmdb_path, folder, total


def child(source: str, path: str, out: str, workers: int) -> None:
    """Run in a fresh process: list, then pack; print one JSON line of times and peaks."""
    import resource

    from dcgan_dist.data import pack
    from dcgan_dist.data.sources import open_source

    imported_rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    count = len(open_source(source, path).items)
    listed = time.perf_counter()
    report = pack.pack(source, path, out, 64, "jpeg", 1000, workers, progress=False)
    done = time.perf_counter()
    assert report["samples"] == count and not report["skipped"], report
    print(json.dumps({"images": count, "list_s": listed - started, "pack_s": done - listed,
                      "imported_rss": imported_rss, "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "worker_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def tree_pss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(source: str, path: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", source, str(path), str(out), str(workers)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(process.pid), [0]

    def sample() -> None:
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], tree_pss(watched))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"pack of {path} failed (exit {process.returncode})")
    return json.loads(output.strip().splitlines()[-1]) | {"tree_pss": peak[0]}


def machine() -> str:
    import PIL
    import torch
    import webdataset

    from dcgan_dist.bench.machine import cpu_flags, describe_machine  # torch: only the table's header needs it

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    vector = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f == "avx2"))
    return (f"{describe_machine(torch.device('cpu'))}; flags {vector}; {os.cpu_count()} CPUs; Pillow {PIL.__version__}, lmdb "
            f"{lmdb.__version__}, webdataset {webdataset.__version__}; load average {load} "
            "(a machine shared with other agents)")


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", help="where the data and shards go (kept; default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, path, out, workers = args.child
        return child(source, path, out, int(workers))
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="packing-bench-"))
    print(machine())
    print(f"{'source':<7} {'images':>7} {'source MiB':>10} {'workers':>7} {'list s':>7} {'pack s':>7} {'img/s':>7} "
          f"{'imported':>9} {'peak main':>9} {'peak worker':>11} {'peak tree PSS':>13}")
    for count in args.counts:
        lmdb_path, folder, total = build(root, count)
        for source, path in (("lsun", lmdb_path), ("folder", folder)):
            for workers in args.workers:
                row = measure(source, path, root / "out", workers)
                worker_peak = f"{row['worker_maxrss'] / MIB:9.0f}" if workers > 1 else f"{'-':>9}"
                print(f"{source:<7} {count:>7} {total / MIB:>10.0f} {workers:>7} {row['list_s']:>7.2f} {row['pack_s']:>7.1f} "
                      f"{count / row['pack_s']:>7.0f} {row['imported_rss'] / MIB:>5.0f} MiB {row['self_maxrss'] / MIB:>5.0f} MiB "
                      f"{worker_peak} MiB {row['tree_pss'] / MIB:>9.0f} MiB", flush=True)
    if not args.work_dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
