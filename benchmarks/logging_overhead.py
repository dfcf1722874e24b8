"""The bare GAN step, and what MLflow logging costs the training loop as a share of it.

Times the GAN step (default config, or --preset/--image-size), then the work the loop adds once
per --log-every window on rank 0: the host read of the window's stats and the (asynchronous)
log_batch call into a sqlite store. Prints one table.

    python benchmarks/logging_overhead.py [--preset paper] [--image-size 64] [--steps 20] [--log-every 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from dcgan_dist.config import Config
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.step import gan_step, make_optimizers
from dcgan_dist.tracking import RunLogger, ensure_experiment

STATS = ("loss_d", "loss_g", "d_real", "d_fake")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--preset", default=Config().model.preset)
    parser.add_argument("--image-size", type=int, default=Config().model.image_size)
    args = parser.parse_args()
    cfg = Config()
    cfg.model.preset, cfg.model.image_size = args.preset, args.image_size
    torch.manual_seed(0)
    generator, discriminator = build_models(cfg.model.preset, cfg.model.image_size, cfg.model.bn)
    opt_g, opt_d = make_optimizers(generator, discriminator, cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2)
    real = torch.rand(cfg.loop.batch_size, 3, cfg.model.image_size, cfg.model.image_size) * 2 - 1

    step_times, window = [], []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        stats = gan_step(generator, discriminator, opt_g, opt_d, real, sample_latent(cfg.loop.batch_size, cfg.model.preset))
        window.append(torch.stack([stats[name] for name in STATS]))
        step_times.append(time.perf_counter() - start)
    step_s = statistics.median(step_times[2:])

    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        ensure_experiment(uri, "bench")
        logger = RunLogger(uri, "bench", "bench", None)
        log_times = []
        for repeat in range(20):
            rows_window = window[: args.log_every]
            start = time.perf_counter()
            rows = torch.stack(rows_window).tolist()
            logger.log_metrics([(repeat * args.log_every + i + 1, dict(zip(STATS, row))) for i, row in enumerate(rows)])
            log_times.append(time.perf_counter() - start)
        logger.finish()
    log_s = statistics.median(log_times)
    share = log_s / (args.log_every * step_s)
    print(f"| config | step (median) | img/s | logging per {args.log_every}-step window | share of step time |")
    print("|---|---|---|---|---|")
    print(f"| {cfg.model.preset} {cfg.model.image_size}px batch {cfg.loop.batch_size} | {step_s * 1e3:.0f} ms "
          f"| {cfg.loop.batch_size / step_s:.0f} | {log_s * 1e3:.1f} ms | {share:.2%} |")


if __name__ == "__main__":
    main()
