"""Generation quality during training: FID/KID against real images under a feature backbone,
the classifier score (digits), the memorisation check, and the best snapshot by score.

`Evaluator` holds what stays fixed for a run: the backbone, the real images and their
features (computed once), and a fixed latent batch, so scores at different steps differ only
because the generator changed. Evaluation never touches the global RNG, so a resumed run still
matches an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dcgan_dist.evaluate import backbones
from dcgan_dist.evaluate.fid import frechet_distance, kernel_inception_distance
from dcgan_dist.evaluate.memorisation import memorisation_check
from dcgan_dist.models import sample_latent

log = logging.getLogger(__name__)

SCORE = "eval/fid"  # the score that picks the best checkpoint and the champion: lower is better
KID_SUBSETS, KID_SUBSET_SIZE = 10, 500
HELD_OUT_SHARE = 4  # the memorisation check's held-out real images: 1/4 of --eval-samples
# Training's end-of-run memorisation check reads the whole training set up to this size (per 100k
# 32 px images at 1,000 samples: ~1 min of reading and ~2.5 of comparing on a loaded 2-core CPU,
# benchmarks/memorisation.py; seconds of comparing on a GPU); a larger set
# is checked against the evaluation pool, and `python -m dcgan_dist.evaluate --memorisation-against` does the whole set.
WHOLE_SET_LIMIT = 200_000


@dataclass
class Best:
    """The best snapshot so far: weights on the CPU, kept in every checkpoint."""

    step: int
    score: float
    generator: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor]

    @classmethod
    def capture(cls, step: int, score: float, generator: nn.Module, discriminator: nn.Module) -> Best:
        def on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
            return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}

        return cls(step, score, on_cpu(generator), on_cpu(discriminator))

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "score": self.score, "generator": self.generator, "discriminator": self.discriminator}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Best | None:
        return cls(**state) if state else None


class Evaluator:
    def __init__(self, backbone: backbones.Backbone, real_images: torch.Tensor, held_out: torch.Tensor,
                 num_samples: int, preset: str, seed: int, kid_subsets: tuple[int, int] = (KID_SUBSETS, KID_SUBSET_SIZE),
                 training_set: Callable[[], Iterable[torch.Tensor]] | None = None):
        self.backbone, self.kid_subsets = backbone, kid_subsets
        self.training_set = training_set  # a fresh pass over the whole training set, or None: the pool
        self.real_images, self.held_out = real_images, held_out
        self.real_features, _ = backbone.embed(real_images)
        self.z = sample_latent(num_samples, preset, rng=torch.Generator().manual_seed(seed + 1))

    @property
    def tags(self) -> dict[str, Any]:
        """What a score is only comparable under: logged with every evaluation."""
        return {"eval.backbone": self.backbone.name, "eval.real_samples": len(self.real_images),
                "eval.fake_samples": len(self.z)}

    @torch.no_grad()
    def generate(self, generator: nn.Module, batch_size: int = 250) -> torch.Tensor:
        """G(z) for the fixed latents, in eval mode (as the registered model runs), on the CPU."""
        was_training = generator.training
        generator.eval()
        device = next(generator.parameters()).device
        images = torch.cat([generator(self.z[i : i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(self.z), batch_size)])
        generator.train(was_training)
        return images

    def evaluate(self, generator: nn.Module) -> dict[str, float]:
        """eval/fid, eval/kid (and its std over subsets), and the backbone's score of the class
        probabilities: eval/confident_share and eval/class_balance (digits), eval/inception_score
        and its std (fid-inception)."""
        with torch.random.fork_rng(devices=[]):
            return self.score(self.generate(generator))

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """evaluate()'s metrics for images already generated."""
        features, probabilities = self.backbone.embed(images)
        kid, kid_std = kernel_inception_distance(features, self.real_features, *self.kid_subsets)
        metrics = {SCORE: frechet_distance(features, self.real_features), "eval/kid": kid, "eval/kid_std": kid_std}
        if probabilities is not None and self.backbone.score is not None:
            metrics |= {f"eval/{name}": value for name, value in self.backbone.score(probabilities).items()}
        return metrics

    def memorisation(self, generator: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """memorisation/* metrics, and pictures: the closest (sample, training image) pairs and
        the histogram of nearest-neighbour distances. Against the whole training set when the run
        has it at hand, else against the evaluation pool (real images outside it as the baseline)."""
        if self.training_set is not None:
            real = self.held_out if len(self.held_out) >= 10 else self.real_images
            metrics, pictures = memorisation_check(self.generate(generator), self.training_set(), real, device=self.backbone.device)
            return {f"memorisation/{name}": value for name, value in metrics.items()}, pictures
        reference, held_out = self.real_images, self.held_out
        if len(held_out) < 10:  # the data set has nothing beyond the reference: split it
            cut = len(reference) - len(reference) // 5
            reference, held_out = reference[:cut], reference[cut:]
        metrics, pictures = memorisation_check(self.generate(generator), reference, held_out)
        return {f"memorisation/{name}": value for name, value in metrics.items()}, pictures


def better(score: float, best: Best | None) -> bool:
    return math.isfinite(score) and (best is None or score < best.score)


def read_real_images(cfg, count: int) -> torch.Tensor:
    """Up to `count` real training images, in a fixed order for the seed (rank 0's stream)."""
    from dcgan_dist import data

    if cfg.data.data in data.SOURCES:
        images = data.open_dataset(cfg.data.data, cfg.model.image_size).tensors[0]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.loop.seed))
        return images[order[:count]]
    batches, collected = data.open_batches(cfg, 0, 1), []
    while sum(len(b) for b in collected) < count:
        collected.append(next(batches))
    return torch.cat(collected)[:count]


def build(cfg, device: torch.device) -> Evaluator:
    """The run's evaluator: backbone from --eval-backbone, real features computed now, once."""
    with torch.random.fork_rng(devices=[]):
        backbone = backbones.load(cfg.eval.eval_backbone, cfg.eval.inception_weights, device)
        n = cfg.eval.eval_samples
        pool = read_real_images(cfg, n + n // HELD_OUT_SHARE)
        return Evaluator(backbone, pool[:n], pool[n:], n, cfg.model.preset, cfg.loop.seed, training_set=whole_training_set(cfg))


def whole_training_set(cfg) -> Callable[[], Iterable[torch.Tensor]] | None:
    """A pass over the run's whole training set for the memorisation check, or None when it is
    over WHOLE_SET_LIMIT images (then the evaluation pool stands in)."""
    from dcgan_dist import data

    if cfg.data.data not in data.SOURCES:
        from dcgan_dist.data import manifest

        count = manifest.read(cfg.data.data).num_samples
        if count > WHOLE_SET_LIMIT:
            log.info("memorisation check against the evaluation pool: the training set's %d images are over %d", count, WHOLE_SET_LIMIT)
            return None
    return lambda: data.every_image(cfg.data.data, cfg.model.image_size, loader_workers=cfg.data.loader_workers)
