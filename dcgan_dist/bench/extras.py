"""What surrounds the step, for `python -m dcgan_dist.bench --extras`: a full training run
(Ray Train + WebDataset shards + MLflow) against the bare step of the same config, MLflow's
logging cost as a share of the step, and the data pipeline's decode rate per core.

The data are the bundled digits packed as JPEG shards at the benchmark's image size in a temporary
folder; MLflow is a sqlite store there too. Needs Ray and MLflow (the bench's step table does not).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from dcgan_dist.bench.variants import Variant, ours_variant, synchronize

FULL_RUN_STEPS = {"cpu": 40, "cuda": 400}
LOG_EVERY = 5
STATS = ("loss_d", "loss_g", "d_real", "d_fake")


def pack_digits(folder: Path, image_size: int) -> str:
    from dcgan_dist.data import pack

    report = pack.pack("digits", None, str(folder / "shards"), image_size, "jpeg", shard_size=300, workers=1, progress=False)
    return report["manifest"]


def full_run(args, manifest_url: str, folder: Path) -> dict[str, float]:
    """A short `python -m dcgan_dist.train` run, in process; its steady-state img/s is the median of
    the logged per-window rates after the first window (which holds start-up and warm-up)."""
    import mlflow

    from dcgan_dist import config, train

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    argv = ["--data", manifest_url, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--max-steps", str(FULL_RUN_STEPS[args.device]), "--log-every", str(LOG_EVERY),
            "--sample-every", "100000", "--checkpoint-every", "100000", "--eval-every", "0", "--no-register-models",
            "--tracking-uri", uri, "--experiment", "bench", "--storage-path", str(folder / "ray_results"),
            "--run-name", "bench", "--preset", "pytorch-examples"]
    if args.device == "cuda":
        argv.append("--use-gpu")
    cfg = train.preflight(config.parse(argv))
    start = time.perf_counter()
    result = train.fit(cfg)
    wall = time.perf_counter() - start
    history = mlflow.MlflowClient(uri).get_metric_history(result.metrics["mlflow_run_id"], "img_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return {"img_per_s": statistics.median(rates), "wall_s": wall, "steps": cfg.loop.max_steps}


def logging_share(args, step_s: float, folder: Path) -> tuple[float, float]:
    """What rank 0 adds once per --log-every window: the host read of the window's stacked stats and
    the hand-off to the MLflow sender thread. Returns (seconds per window, share of the window's steps)."""
    from dcgan_dist.tracking.run_logger import RunLogger
    from dcgan_dist.tracking.store import ensure_experiment

    uri = f"sqlite:///{folder / 'logging.db'}"
    ensure_experiment(uri, "bench")
    logger = RunLogger(uri, "bench", "bench", None)
    window = [torch.rand(len(STATS)) for _ in range(10)]
    times = []
    for repeat in range(20):
        start = time.perf_counter()
        rows = torch.stack(window).tolist()
        logger.log_metrics([(repeat * 10 + i + 1, dict(zip(STATS, row))) for i, row in enumerate(rows)])
        times.append(time.perf_counter() - start)
    logger.finish()
    per_window = statistics.median(times)
    return per_window, per_window / (10 * step_s)


def decode_rate_per_core(manifest_url: str, batch: int) -> float:
    """Shards read, decoded and scaled by the training reader in this process, one torch thread."""
    from dcgan_dist.data import manifest, stream

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = stream.ShardBatches(manifest.read(manifest_url), batch, 0, 1, 0, loader_workers=0, shuffle_buffer=100)
        next(batches)  # opens the first shards
        count, start = 0, time.perf_counter()
        while count < 8 * batch:
            count += len(next(batches))
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def bare_step_seconds(args) -> float:
    """The training default (channels_last, fp32) at this size and batch, median of a few steps."""
    device = torch.device(args.device)
    reals = [(torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1).to(device)]
    step, _ = ours_variant(device, args.image_size, args.batch_size, reals, channels_last=True)
    times = []
    for _ in range(args.warmup + args.steps * 2):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup:])


def print_extras(args, table: list[Variant]) -> None:
    """The rows around the step, as a second table under the variants'."""
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        manifest_url = pack_digits(folder, args.image_size)
        step_s = bare_step_seconds(args)
        rows.append(("bare step, training default (channels_last, fp32), same process", f"{args.batch_size / step_s:,.0f} img/s"))
        per_window, share = logging_share(args, step_s, folder)
        rows.append(("MLflow logging per 10-step window (host read + hand-off to the sender thread)",
                     f"{per_window * 1e6:.0f} us = {share:.4%} of step time"))
        rows.append(("data pipeline: read + decode + scale digits JPEG shards, 1 thread",
                     f"{decode_rate_per_core(manifest_url, args.batch_size):,.0f} img/s per core"))
        try:
            import ray  # noqa: F401
        except ImportError:
            rows.append(("full run (Ray Train + WebDataset + MLflow)", "skipped: Ray is not installed here"))
        else:
            full = full_run(args, manifest_url, folder)
            rows.append((f"full run, steady state ({full['steps']} steps, 1 worker, WebDataset shards, MLflow)",
                         f"{full['img_per_s']:,.0f} img/s = {full['img_per_s'] * step_s / args.batch_size:.0%} of the bare step"
                         f" ({full['wall_s']:.0f} s wall incl. Ray start)"))
    reference = [v for v in table if v.name.startswith("reference") and v.rate]
    if reference:
        rows.append(("reference step (from the table above)", f"{reference[0].rate:,.0f} img/s"))
    print("\n| around the step | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {result} |")
