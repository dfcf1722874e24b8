"""What registering the models costs at the end of a training run: `registry.log_models` (log G
and D as MLflow models, register a version of each) into a fresh sqlite store, in this process.

    PYTHONPATH=. python benchmarks/registration.py --repeats 3

The first call is the one a run pays (it also imports `mlflow.pytorch` and, for the format it
saves, the serializer); the later ones are what a second registration in the same run costs (the
champion, then the last step). The format column is read from what was logged, so the same
script times any version of the registry (PYTHONPATH=/path/to/other/checkout).
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from dcgan_dist.models import Architecture
from dcgan_dist.tracking import registry


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="pytorch-examples")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--bn", default="paper")
    args = parser.parse_args()
    torch.manual_seed(0)
    architecture = Architecture.of(args.preset, args.image_size, args.bn)
    generator, discriminator = architecture.build()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # mlruns/ lands here
        mlflow.set_tracking_uri(f"sqlite:///{Path(folder, 'mlflow.db')}")
        mlflow.set_experiment("registration")
        seconds = []
        with mlflow.start_run():
            for _ in range(args.repeats):
                start = time.perf_counter()
                registry.log_models(architecture, generator.state_dict(), discriminator.state_dict(), step=1)
                seconds.append(time.perf_counter() - start)
        saved = sorted(p.name for p in Path(mlflow.artifacts.download_artifacts("models:/dcgan-generator@latest"), "data").iterdir())
    kind = "pt2 (torch.export)" if "model.pt2" in saved else "TorchScript" if "model.pth" in saved else ", ".join(saved)
    later = f"{statistics.median(seconds[1:]):.2f}" if len(seconds) > 1 else "-"
    print(f"| model | format | first log_models (s) | later ones, median (s) | torch |\n|---|---|---|---|---|\n"
          f"| {args.preset} {args.image_size} px, bn {args.bn} | {kind} | {seconds[0]:.2f} | {later} | {torch.__version__} |")


if __name__ == "__main__":
    main()
