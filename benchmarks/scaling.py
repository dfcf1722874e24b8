"""Data-parallel scaling: training img/s with 1, 2, ... Ray Train workers, and the efficiency
of each added worker. Not a test.

Every row is a real `dcgan_dist.train` run (TorchTrainer, DDP over gloo or NCCL, the bundled
digits) on a fresh local Ray instance (or --ray-address), with the GLOBAL batch fixed (the
paper's 128, split over the workers). Throughput is what the loop logs as `img_per_s` for each
--log-every window, the median over all windows but the first: startup, model building and
the first steps are excluded. Efficiency = img/s(N) / (N x img/s(1)).

    python benchmarks/scaling.py                       # CPU: 1 and 2 workers, CPUs shared evenly
    python benchmarks/scaling.py --use-gpu --workers 1,2,4,8
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import statistics
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from dcgan_dist import config
from dcgan_dist.train import fit, preflight


def measure(num_workers: int, args: argparse.Namespace, folder: Path) -> dict:
    cfg = config.from_flat({
        "num_workers": num_workers, "use_gpu": args.use_gpu, "batch_size": args.batch_size,
        "preset": args.preset, "image_size": args.image_size, "max_steps": args.steps, "log_every": args.log_every,
        "sample_every": args.steps, "checkpoint_every": args.steps, "register_models": False,
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "scaling",
        "storage_path": str(folder / "ray_results"), "run_name": f"workers-{num_workers}",
        "ray_address": args.ray_address, "cpus_per_worker": args.cpus_per_worker,
    })
    result = fit(preflight(config.validate(cfg)))
    client = MlflowClient(cfg.tracking.tracking_uri)
    windows = sorted(client.get_metric_history(result.metrics["mlflow_run_id"], "img_per_s"), key=lambda m: m.step)
    rates = [m.value for m in windows[1:]]  # the first window holds warm-up
    return {"workers": num_workers, "cpus": cfg.cluster.cpus_per_worker, "per_worker_batch": cfg.loop.batch_size // num_workers,
            "img_per_s": statistics.median(rates), "spread": (min(rates), max(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the workers")
    parser.add_argument("--preset", default="pytorch-examples")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--cpus-per-worker", type=int, default=0, help="0 = the CPUs shared evenly among the workers")
    parser.add_argument("--ray-address", default="", help="an existing cluster; default: a fresh local instance per row")
    args = parser.parse_args()

    import ray

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for num_workers in (int(n) for n in args.workers.split(",")):
            if not args.ray_address:
                # The dashboard stays on: Ray Train's placement-group cleaner asks its State API about the run.
                ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
            rows.append(measure(num_workers, args, Path(folder)))
            if not args.ray_address:
                ray.shutdown()

    base = rows[0]["img_per_s"] / rows[0]["workers"]
    device = "GPU" if args.use_gpu else "CPU"
    print(f"\n{args.preset} {args.image_size}px, global batch {args.batch_size}, {args.steps} steps, {device}")
    print("| workers | CPUs/worker | batch/worker | img/s (median window) | min-max | speedup | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        speedup = row["img_per_s"] / rows[0]["img_per_s"]
        efficiency = row["img_per_s"] / (row["workers"] * base)
        low, high = row["spread"]
        print(f"| {row['workers']} | {row['cpus']} | {row['per_worker_batch']} | {row['img_per_s']:.0f} | "
              f"{low:.0f}-{high:.0f} | {speedup:.2f}x | {efficiency:.0%} |")


if __name__ == "__main__":
    main()
