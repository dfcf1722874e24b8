"""What the memorisation check against the whole training set costs: one pass over the set
through the data reader (a PNG shard manifest of the digits, packed to a temporary folder), and
the chunked nearest-neighbour search (float64 distances, running minimum) for Q queries. Prints
one table, and the rate in multiply-adds per second that the search reached, from which the cost
on any set follows: seconds = reading the set + Q x N x pixels / rate.

    python benchmarks/memorisation.py [--queries 1000 5000] [--device cpu]
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import tempfile
import time

import torch

from dcgan_dist.data import every_image
from dcgan_dist.data.pack import pack
from dcgan_dist.evaluate.memorisation import memorisation_check, nearest_training_images


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--queries", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        manifest = pack("digits", None, folder, 32, image_format="png", shard_size=500, progress=False)["manifest"]
        next(iter(every_image(manifest, 32)))  # warm-up: imports and the decoder's first call are not the pass
        training, read_s = timed(lambda: torch.cat(list(every_image(manifest, 32))))
        count, pixels = len(training), training[0].numel()
        rows.append((f"read the whole set once ({count} images, 32 px PNG shards, in-process)", read_s, ""))
        for queries in args.queries:
            samples = torch.rand(queries, 3, 32, 32) * 2 - 1
            _, search_s = timed(lambda samples=samples: nearest_training_images(samples, training.split(1024), device=args.device))
            rate = queries * count * pixels / search_s
            rows.append((f"nearest-neighbour search, {queries} queries x {count} images", search_s, f"{rate / 1e9:.2f}"))
            _, check_s = timed(lambda samples=samples: memorisation_check(samples, every_image(manifest, 32), training[:1000], device=args.device))
            rows.append((f"memorisation_check, {queries} samples + 1000 real, streamed from the shards", check_s, ""))
    print(f"| measurement ({args.device}, {torch.get_num_threads()} threads) | seconds | G multiply-adds/s |")
    print("|---|---|---|")
    for name, seconds, rate in rows:
        print(f"| {name} | {seconds:.3f} | {rate} |")


if __name__ == "__main__":
    main()
