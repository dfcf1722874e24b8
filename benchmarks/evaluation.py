"""What one evaluation costs: generating --eval-samples images, embedding them, FID and KID;
plus the once-per-run real-image features and the end-of-run memorisation check.

The digits backbone is the cached classifier (trained first if missing; not timed). The
Inception backbone gets random weights saved to a file: its cost is the same as with real
weights. Prints one table; a GAN step (default config, batch 128) is timed for scale.

    python benchmarks/evaluation.py [--samples 1000] [--inception-samples 200] [--device cpu]
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dcgan_dist.config import Config
from dcgan_dist.evaluate import Evaluator, backbones, read_real_images
from dcgan_dist.evaluate.fid import frechet_distance, kernel_inception_distance
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.step import gan_step, make_optimizers


def timed(function, repeats: int = 1):
    start = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return result, (time.perf_counter() - start) / repeats


def measure(backbone: backbones.Backbone, samples: int, generator, cfg: Config) -> list[tuple[str, float]]:
    pool = read_real_images(cfg, samples + samples // 4)
    evaluator, build_s = timed(lambda: Evaluator(backbone, pool[:samples], pool[samples:], samples, cfg.model.preset, 0))
    images, generate_s = timed(lambda: evaluator.generate(generator))
    (features, _), embed_s = timed(lambda: backbone.embed(images))
    _, fid_s = timed(lambda: frechet_distance(features, evaluator.real_features))
    _, kid_s = timed(lambda: kernel_inception_distance(features, evaluator.real_features, 10, 500))
    _, total_s = timed(lambda: evaluator.evaluate(generator))
    _, memorisation_s = timed(lambda: evaluator.memorisation(generator))
    name = f"{backbone.name}, {samples} samples"
    return [(f"{name}: real features (once per run)", build_s), (f"{name}: generate", generate_s),
            (f"{name}: embed", embed_s), (f"{name}: FID", fid_s), (f"{name}: KID (10 x 500)", kid_s),
            (f"{name}: **one evaluation, all of it**", total_s), (f"{name}: memorisation check (once, at the end)", memorisation_s)]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--samples", type=int, default=Config().eval.eval_samples)
    parser.add_argument("--inception-samples", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = Config()
    device = torch.device(args.device)
    torch.manual_seed(0)
    generator, discriminator = build_models(cfg.model.preset, cfg.model.image_size, cfg.model.bn)
    generator, discriminator = generator.to(device), discriminator.to(device)

    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    real = torch.rand(cfg.loop.batch_size, 3, cfg.model.image_size, cfg.model.image_size, device=device) * 2 - 1
    z = sample_latent(cfg.loop.batch_size, cfg.model.preset, device)
    gan_step(generator, discriminator, opt_g, opt_d, real, z)
    _, step_s = timed(lambda: gan_step(generator, discriminator, opt_g, opt_d, real, z), repeats=5)

    rows = [(f"one GAN step ({cfg.model.preset}, {cfg.model.image_size} px, batch {cfg.loop.batch_size})", step_s)]
    rows += measure(backbones.load("digits", device=device), args.samples, generator, cfg)
    if args.inception_samples:
        from torchvision.models import inception_v3

        with tempfile.TemporaryDirectory() as folder:
            weights = Path(folder, "inception.pth")
            torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
            rows += measure(backbones.load("inception", str(weights), device), args.inception_samples, generator, cfg)

    print(f"| measurement ({device}, {torch.get_num_threads()} threads) | seconds | GAN steps |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / step_s:.1f} |")


if __name__ == "__main__":
    main()
