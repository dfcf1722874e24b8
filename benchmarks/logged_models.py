"""What logging an evaluated checkpoint as MLflow 3 LoggedModels costs (`registry.log_checkpoint`:
G and D, `mlflow.pytorch.log_model(..., step=step)`), per evaluation, in seconds and bytes, into
a local `mlflow server` (sqlite backend, artifacts proxied into a local folder, as a real server
stores them) started by this script on 127.0.0.1.

    PYTHONPATH=. python benchmarks/logged_models.py --evaluations 3 --history-steps 0,5000

MLflow's log_model(step=S) also links the run's metrics of step S to the model: it reads the
whole history of every metric the run holds to find them, so the cost grows with the run's
length; `--history-steps` fills the run with that many steps of the loop's 12 per-step metrics
first. Bytes: what the artifact folder grew by per evaluation (G and D, each TorchScript plus its
state_dict.pt). `--logged-models champion-and-last` pays this twice per run instead.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from dcgan_dist.models import Architecture
from dcgan_dist.tracking import registry

PER_STEP = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "img_per_s", "epoch", "world_size",
            "system/cpu", "system/memory", "system/disk")  # about what a run logs per step


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            return server, uri
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def fill_history(client: MlflowClient, run_id: str, steps: int) -> None:
    metrics = [Metric(name, 0.5, 1_000 + step, step) for step in range(1, steps + 1) for name in PER_STEP]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def measure(uri: str, artifacts: Path, architecture: Architecture, history_steps: int, evaluations: int) -> tuple[list[float], list[int]]:
    client = MlflowClient(uri)
    mlflow.set_experiment(f"logged-models-{history_steps}")
    seconds, sizes = [], []
    with mlflow.start_run() as run:
        fill_history(client, run.info.run_id, history_steps)
        for evaluation in range(evaluations):
            generator, discriminator = architecture.build()
            before = folder_bytes(artifacts) if artifacts.exists() else 0
            start = time.perf_counter()
            registry.log_checkpoint(architecture, generator.state_dict(), discriminator.state_dict(), history_steps + 1 + evaluation)
            seconds.append(time.perf_counter() - start)
            sizes.append(folder_bytes(artifacts) - before)
    return seconds, sizes


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--evaluations", type=int, default=3)
    parser.add_argument("--history-steps", default="0,5000", help="comma-separated: steps of metrics the run holds first")
    parser.add_argument("--preset", default="pytorch-examples")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    architecture = Architecture.of(args.preset, args.image_size, "paper")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        server, uri = start_server(Path(folder))
        try:
            mlflow.set_tracking_uri(uri)
            for history in (int(value) for value in args.history_steps.split(",")):
                seconds, sizes = measure(uri, Path(folder, "artifacts"), architecture, history, args.evaluations)
                rows.append((history, seconds, sizes))
        finally:
            server.terminate()
            server.wait(30)
    print(f"| model | run's history (steps x {len(PER_STEP)} metrics) | first evaluation (s) | later ones, median (s) "
          f"| MB per evaluation (G+D) | mlflow | torch |\n|---|---|---|---|---|---|---|")
    for history, seconds, sizes in rows:
        later = f"{statistics.median(seconds[1:]):.2f}" if len(seconds) > 1 else "-"
        print(f"| {args.preset} {args.image_size} px | {history} | {seconds[0]:.2f} | {later} | {statistics.median(sizes) / 1e6:.1f} "
              f"| {mlflow.__version__} | {torch.__version__} |")


if __name__ == "__main__":
    main()
