"""What a checkpoint costs the training step, synchronous vs asynchronous upload. Prints one table.

    PYTHONPATH=$PWD flock /tmp/ray.lock python benchmarks/checkpoint_stall.py [--uplink-mb-s 40] [--checkpoints 4]

Ray Train 2.60 runs one TorchTrainer worker (real Ray, real `ray.train.report`) that checkpoints
the 64 px pytorch-examples DCGAN's full state (G, D, both Adam states after a step: 76 MB) exactly
as the training loop does: `CheckpointUploads.stage`, `checkpoint.save`, `CheckpointUploads.report`
(dcgan_dist/checkpoint_upload.py, the manifest included), `--checkpoints` times, with
`--interval-s` of sleep between them for the steps (a GPU's work: the worker's CPU stays free).
The stall is the training thread's time in those three calls per checkpoint (the loop's
`checkpoint/stall_s`, waits for a previous upload included); "metrics report" is the next
metrics-only report's return time. Storage: `moto_server` on 127.0.0.1 (its own process) behind
tests/fault_proxy.py with an uplink of `--uplink-mb-s` (so an upload takes seconds, as over a real
network), and a local folder.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

CASES = [  # (storage, --checkpoint-upload, metrics reports, interval: "long" or "short")
    ("s3", "sync", "same mode", "long"),
    ("s3", "async", "same mode", "long"),
    ("s3", "async", "same mode", "short"),
    ("s3", "async", "sync", "short"),  # a metrics-only report in SYNC mode behind an async checkpoint
    ("local", "sync", "same mode", "long"),
    ("local", "async", "same mode", "long"),
]


def train_fn(config: dict) -> None:
    """The worker: one case's checkpoints, timed; results appended to config["out"] as JSON lines."""
    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    from dcgan_dist import checkpoint
    from dcgan_dist.checkpoint_upload import CheckpointUploads
    from dcgan_dist.models import Architecture, build_models, sample_latent
    from dcgan_dist.step import gan_step, make_optimizers

    generator, discriminator = build_models("pytorch-examples", 64, "paper")
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    gan_step(generator, discriminator, opt_g, opt_d, torch.rand(8, 3, 64, 64) * 2 - 1, sample_latent(8, "pytorch-examples"), "fp32")
    architecture = Architecture.of("pytorch-examples", 64, "paper")
    for storage, mode, metrics_mode, interval in config["cases"]:
        uploads = CheckpointUploads.for_worker(mode, 0, 1)
        rows, upload_s = [], []
        for index in range(config["checkpoints"]):
            time.sleep(config["interval_s"][interval])  # the steps between checkpoints
            step = index + 1
            directory = uploads.stage(step)
            if step > 1:
                upload_s.append(uploads.upload_s)  # the previous upload's: it has ended by now
            checkpoint.save(directory, rank=0, device=torch.device("cpu"), step=step, generator=generator, discriminator=discriminator,
                            opt_g=opt_g, opt_d=opt_d, mlflow_run_id=None, config={}, architecture=architecture)
            size = sum(path.stat().st_size for path in directory.iterdir())
            uploads.report({"step": step}, directory)
            started = time.perf_counter()
            if metrics_mode == "sync":
                ray.train.report({"step": step}, checkpoint_upload_mode=CheckpointUploadMode.SYNC)
            else:
                uploads.report_metrics({"step": step})
            rows.append(uploads.metrics() | {"metrics_report_s": time.perf_counter() - started, "bytes": size})
        uploads.wait()
        upload_s.append(uploads.upload_s)
        with open(config["out"], "a") as out:
            out.write(json.dumps({"case": [storage, mode, metrics_mode, interval], "rows": rows, "upload_s": upload_s}) + "\n")


def start_s3(uplink_mb_s: float):
    """moto_server in its own process, the proxy in front of it; AWS_* set for train.storage."""
    from loopback_s3 import start_moto_server

    from tests.fault_proxy import FaultProxy

    server, url = start_moto_server()
    proxy = FaultProxy(url, upload_bytes_per_s=uplink_mb_s * 1e6).start()
    os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
    return server, proxy


def fit(storage_path: str, cases: list, args, out: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    from dcgan_dist.train import storage

    config = {"cases": cases, "checkpoints": args.checkpoints, "out": str(out),
              "interval_s": {"long": args.interval_s, "short": args.short_interval_s}}
    TorchTrainer(train_fn, train_loop_config=config, scaling_config=ray.train.ScalingConfig(num_workers=1),
                 run_config=ray.train.RunConfig(name=f"stall-{int(time.time())}", **storage(storage_path),
                                                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                                logging_config=ray.train.LoggingConfig(log_level="WARNING"))).fit()


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per case")
    parser.add_argument("--uplink-mb-s", type=float, default=40.0, help="the proxy's upload rate to loopback S3")
    parser.add_argument("--interval-s", type=float, default=6.0, help="the long interval between checkpoints (past an upload)")
    parser.add_argument("--short-interval-s", type=float, default=0.5, help="the short one (the upload still runs)")
    args = parser.parse_args()

    import ray
    import torch

    from dcgan_dist.bench.machine import describe_machine

    server, proxy = start_s3(args.uplink_mb_s)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "rows.jsonl"
            fit("s3://bench/runs", [case for case in CASES if case[0] == "s3"], args, out)
            fit(str(Path(scratch) / "local"), [case for case in CASES if case[0] == "local"], args, out)
            results = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        ray.shutdown()
        proxy.stop()
        server.terminate()
        server.wait(timeout=30)

    print(f"\nmachine: {os.cpu_count()} cores, {describe_machine(torch.device('cpu'))}; python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, ray {ray.__version__}, pyarrow {__import__('pyarrow').__version__}")
    size_mb = results[0]["rows"][0]["bytes"] / 1e6
    print(f"checkpoint {size_mb:.1f} MB; S3 uplink {args.uplink_mb_s:g} MB/s; intervals long {args.interval_s:g} s, "
          f"short {args.short_interval_s:g} s; {args.checkpoints} checkpoints per row\n")
    print("| storage | upload | metrics reports | interval | stall per checkpoint, median (max) | waits (s) | upload s, median "
          "| metrics report after it, max |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for result in results:
        storage_kind, mode, metrics_mode, interval = result["case"]
        rows = result["rows"]
        stalls = [row["checkpoint/stall_s"] for row in rows]
        uploads = result["upload_s"]
        print(f"| {storage_kind} | {mode} | {metrics_mode} | {interval} | {statistics.median(stalls):.2f} s ({max(stalls):.2f}) "
              f"| {rows[-1]['checkpoint/upload_waits']} ({rows[-1]['checkpoint/upload_wait_s']:.2f}) | {statistics.median(uploads):.2f} s "
              f"| {max(row['metrics_report_s'] for row in rows):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
