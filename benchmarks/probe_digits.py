"""The L2-SVM probe on the bundled digits against training length: how many steps until D's
features reach 80 %, next to raw pixels and a random D.

    PYTHONPATH=. python benchmarks/probe_digits.py --steps 0,50,100,200,300 --batch-size 32

Trains in this process (one CPU worker, no Ray: the same models, step and data stream as a
1-worker run with the same seed) and probes D at each listed step.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import time

import torch

from dcgan_dist.choices import C_GRID
from dcgan_dist.data import batch_stream, open_dataset
from dcgan_dist.models import Architecture, build_models, sample_latent
from dcgan_dist.probe.__main__ import DATASETS, load_digits_splits, run_probe
from dcgan_dist.step import gan_step, make_optimizers
from dcgan_dist.tracking.registry import LoadedNetwork


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--steps", default="0,50,100,200,300")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="pytorch-examples")
    parser.add_argument("--bn", default="paper")
    parser.add_argument("--subsets", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c-grid", default=",".join(f"{c:g}" for c in C_GRID))
    args = parser.parse_args()
    checkpoints = sorted(int(s) for s in args.steps.split(","))

    torch.manual_seed(args.seed)
    generator, discriminator = build_models(args.preset, 32, args.bn)
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    batches = batch_stream(open_dataset("digits", 32), args.batch_size, 0, 1, args.seed)
    splits = load_digits_splits(32)
    architecture = Architecture.of(args.preset, 32, args.bn)
    print(f"| steps | train s | trained D | {DATASETS['digits'].per_class}/class | random D | raw pixels | probe s |")
    print("|---|---|---|---|---|---|---|")
    step, train_s = 0, 0.0
    for target in checkpoints:
        start = time.perf_counter()
        generator.train(), discriminator.train()
        while step < target:
            gan_step(generator, discriminator, opt_g, opt_d, next(batches)[0],
                     sample_latent(args.batch_size, args.preset))
            step += 1
        train_s += time.perf_counter() - start
        start = time.perf_counter()
        r = run_probe(LoadedNetwork(discriminator, architecture, None, step), splits, DATASETS["digits"].per_class, (args.subsets, 0),
                      tuple(float(c) for c in args.c_grid.split(",")))
        d, few = r["discriminator"], r["discriminator"]["few"]
        print(f"| {step} | {train_s:.0f} | {d['accuracy']:.1%} | {few['mean']:.1%} +/- {few['std']:.1%} "
              f"| {r['random_d']['accuracy']:.1%} | {r['raw_pixels']['accuracy']:.1%} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
