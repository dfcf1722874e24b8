"""What holding the probe's features as float16 costs: the same features (one extraction, float32)
through the same protocol as float32 and cast to float16, on the bundled digits.

    PYTHONPATH=. python benchmarks/probe_feature_dtype.py --preset imagenet32 --c-grid 1e-4,1e-3,1e-2 --draws 3

D is a randomly initialised one of the preset (seed 0) with its BatchNorm statistics re-estimated
on the training images: the dtype question is about the features' values, not how D was trained.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import time

import numpy as np
import torch

from dcgan_dist.choices import C_GRID
from dcgan_dist.models import build_models
from dcgan_dist.probe.data import DATASETS, load_digits_splits
from dcgan_dist.probe.protocol import SvmFits, extract_features, few_labels, full_fit, set_bn_statistics


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--preset", default="imagenet32")
    parser.add_argument("--c-grid", default=",".join(f"{c:g}" for c in C_GRID))
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    c_grid = tuple(float(c) for c in args.c_grid.split(","))
    torch.manual_seed(0)
    _, discriminator = build_models(args.preset, 32, "paper")
    splits = load_digits_splits(32)
    set_bn_statistics(discriminator, splits.train[0], "reestimate")
    labels = {split: getattr(splits, split)[1] for split in ("train", "val", "test")}
    full = {split: extract_features(discriminator, getattr(splits, split)[0]) for split in ("train", "val", "test")}
    half = {split: values.astype(np.float16) for split, values in full.items()}
    error = max(float(np.abs(half[s].astype(np.float32) - full[s]).max() / np.abs(full[s]).max()) for s in full)
    print(f"{args.preset} on digits: {full['train'].shape[1]:,} dims; largest float16 rounding error "
          f"{error:.1e} of the largest feature")
    print(f"| features | bytes (3 splits) | accuracy (C) | {DATASETS['digits'].per_class} per class, {args.draws} draws (C) "
          "| SVM fits | s |")
    print("|---|---|---|---|---|---|")
    for name, features in (("float32", full), ("float16", half)):
        start, counter = time.perf_counter(), SvmFits("liblinear")
        few = few_labels(features, labels, DATASETS["digits"].per_class, args.draws, 0, c_grid, counter)
        whole = full_fit(features, labels, c_grid, counter)
        size = sum(f.nbytes for f in features.values())
        print(f"| {name} | {size / 2**20:.0f} MiB | {whole['accuracy']:.2%} ({whole['C']:g}) | {few['mean']:.2%} +/- "
              f"{few['std']:.2%} ({few['C']:g}) | {counter.fits} ({counter.not_converged} not converged) "
              f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
