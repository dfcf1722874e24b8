"""Precision and recall of `shards dedup`'s hash (the paper's section 4.1.1) on the bundled digits
with three planted near copies of each of 100 of them (shifted by a pixel, JPEG quality 70,
Gaussian noise sigma 8/255): one autoencoder per epoch count, the bits at several thresholds.

    python benchmarks/dedup_digits.py [--epochs 3 10] [--thresholds 1 2 3]

Pairs: a found pair is right when both are the same original or its copies; recall is over the
300 original-copy pairs and the copy-copy pairs (600 in all), and per kind of copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from dcgan_dist.data import dedup, manifest


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load} (shared machine)")
    with tempfile.TemporaryDirectory() as folder:
        url, truth = dedup.planted_digits(folder)
        shards = manifest.read(url)
        keys = [sample["__key__"] for sample in dedup.samples(shards)]
        print(f"{'epochs':>6} {'threshold':>9} {'train s':>7} {'bits set':>8} {'groups':>6} {'removed':>7} {'precision':>9} "
              f"{'recall':>6} " + " ".join(f"{kind:>6}" for kind in dedup.COPY_KINDS))
        for epochs in args.epochs:
            settings = dedup.DedupSettings(epochs=epochs)
            started = time.perf_counter()
            model = dedup.train(dedup.training_set(shards, settings), settings)
            trained = time.perf_counter() - started
            for threshold in args.thresholds:
                codes, readable = dedup.hash_codes(model, shards, dataclasses.replace(settings, threshold=threshold))
                groups = [[keys[i] for i in group] for group in dedup.duplicate_groups(codes, readable)]
                scores = dedup.pair_scores(groups, truth)
                per_kind = dedup.kind_recalls(groups, truth).values()
                bits = float(np.unpackbits(codes, axis=1).mean())
                print(f"{epochs:>6} {threshold:>9.1f} {trained:>7.1f} {bits:>8.3f} {len(groups):>6} {sum(len(g) - 1 for g in groups):>7} "
                      f"{scores['precision']:>9.3f} {scores['recall']:>6.3f} " + " ".join(f"{r:>6.2f}" for r in per_kind), flush=True)


if __name__ == "__main__":
    main()
