"""`shards bench`: the rate at which training's own reader (data.open_batches: DataLoader
processes, shuffle, decode, batching) delivers a manifest's images, and how many loader
processes a training step of a given rate needs.

Nothing here reads shards itself: it builds the training config for one rank and times
`open_batches(...)`, so what it measures is what a run with those settings gets.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from dcgan_dist.config import Config


def reader_config(url: str, loader_workers: int, batch_size: int, sampling: str, shuffle_buffer: int, image_size: int,
                  decode: str = "cpu") -> Config:
    """The config of a one-rank run reading `url` with these reader settings (a GPU run with
    --decode gpu: batches are pinned and go to the GPU, decoded there)."""
    cfg = Config()
    cfg.data.data, cfg.data.loader_workers, cfg.data.sampling, cfg.data.shuffle_buffer = url, loader_workers, sampling, shuffle_buffer
    cfg.loop.batch_size, cfg.model.image_size, cfg.data.decode = batch_size, image_size, decode
    cfg.cluster.use_gpu = decode == "gpu"
    return cfg


def child_pids() -> list[int]:
    """This process's children (the DataLoader's loader processes), from /proc (OSError without it)."""
    return [int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]


def loader_cpu_seconds(pids: list[int] | None = None) -> float | None:
    """CPU seconds used so far by `pids` (by default this process's children: the DataLoader's
    loader processes), from /proc; None where there is no /proc (the row is then left out)."""
    try:
        total = 0
        for pid in child_pids() if pids is None else pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
        return total / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def measure(cfg: Config, seconds: float) -> dict:
    """Images per second delivered to the training process over `seconds`, after the first batch
    (which pays for starting the loader processes and opening the first shards)."""
    import torch  # only needed here

    from dcgan_dist.data import open_batches

    device = torch.device("cuda" if cfg.cluster.use_gpu else "cpu")  # where training would want its batches
    # This process only scales batches (or, --loader-workers 0, reads them too); one thread, as a
    # DataLoader process has: a thread pool on busy cores waits more than it works (10x slower, measured).
    torch.set_num_threads(1)
    batches = open_batches(cfg, rank=0, world_size=1, device=device)
    next(batches)
    images, start, cpu_start = 0, time.perf_counter(), loader_cpu_seconds()
    while (elapsed := time.perf_counter() - start) < seconds:
        images += len(next(batches))
    if device.type == "cuda":  # the last batches' decode and scaling are queued on the GPU
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    cpu_end = loader_cpu_seconds()
    counts = batches.counts()
    del batches  # stops the loader processes
    loader_cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return {"images": images, "seconds": elapsed, "img_s": images / elapsed, "counts": counts, "loader_cpu_s": loader_cpu}


def processes_needed(step_img_s: float, img_s_per_process: float) -> int:
    """Loader processes that keep a step consuming `step_img_s` images per second fed."""
    return math.ceil(step_img_s / img_s_per_process) if img_s_per_process > 0 else 0


def report_lines(result: dict, loader_workers: int, step_img_s: float | None) -> list[str]:
    """The table `shards bench` prints; the last line is `shards bench: <img/s> img/s with <N> loader processes`."""
    per_process = result["img_s"] / max(loader_workers, 1)  # 0 workers: the training process reads
    rows = [("loader processes", f"{loader_workers}" + (" (reading in the training process)" if loader_workers == 0 else "")),
            ("images delivered", f"{result['images']:,} in {result['seconds']:.1f} s"),
            ("delivered", f"{result['img_s']:,.0f} img/s"),
            ("per loader process", f"{per_process:,.0f} img/s")]
    if loader_workers > 0 and (cpu := result.get("loader_cpu_s")) is not None:
        # What a loader process does per second of a core it gets: above the row before when the
        # loader processes wait (on the training process, or for cores the machine shares out).
        busy = cpu / (result["seconds"] * loader_workers)
        rows.append(("per loader CPU second", f"{result['images'] / cpu:,.0f} img/s (loader processes busy {busy:.0%})"
                     if cpu > 0 else "under the CPU clock's resolution"))
    skipped = {name: value for name, value in result["counts"].items() if name != "samples" and value}
    if skipped:
        rows.append(("skipped or repeated", ", ".join(f"{name} {value}" for name, value in skipped.items())))
    if step_img_s is not None:
        rows.append((f"to feed {step_img_s:,.0f} img/s", f"{processes_needed(step_img_s, per_process)} loader processes"))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows] + [
        f"shards bench: {result['img_s']:.0f} img/s with {loader_workers} loader processes"]
