"""The authors' SVHN GAN through our import, with and without Theano's kernel flip: a table of
what the authors' own D makes of each G's samples, and both sample grids for docs/fidelity.md.

    PYTHONPATH=. python benchmarks/authors_svhn.py [--folder ../shared/authors-dcgan] [--out docs]

Writes OUT/samples-svhn32-authors.png (the import as it is) and
OUT/samples-svhn32-authors-unflipped.png (the same G with its transposed-conv kernels not
flipped, as a naive port reads Theano's arrays), 64 samples of the same latents, G in eval mode
with the import's re-estimated BatchNorm statistics.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import copy
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from dcgan_dist.authors.weights import load_authors
from dcgan_dist.models import sample_latent
from dcgan_dist.util import grid_uint8

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--folder", default=str(REPO.parent / "shared" / "authors-dcgan"))
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--samples", type=int, default=512, help="samples per G for the table")
    args = parser.parse_args()
    imported = load_authors(args.folder)
    unflipped = copy.deepcopy(imported.generator)
    for module in unflipped.modules():
        if isinstance(module, nn.ConvTranspose2d):
            module.weight.data = module.weight.data.flip(2, 3)
    z = sample_latent(args.samples, "svhn32", rng=torch.Generator().manual_seed(0))
    print(f"the authors' SVHN GAN ({imported.folder.name}, epoch {imported.epoch}), {args.samples} samples per G; "
          f"BatchNorm: {imported.statistics}\n")
    print("| G | D's mean logit, batch statistics (the authors') | D's mean logit, re-estimated statistics (eval) | mean abs. pixel change vs flipped |")
    print("|---|---|---|---|")
    discriminator = imported.discriminator
    with torch.no_grad():
        flipped_images = imported.generator(z)
        for name, generator, file in (("kernels flipped (the import)", imported.generator, "samples-svhn32-authors.png"),
                                      ("kernels not flipped", unflipped, "samples-svhn32-authors-unflipped.png")):
            images = generator(z)
            batch_logits = copy.deepcopy(discriminator).train()(images)  # a copy: train mode moves the running statistics
            eval_logits = discriminator.eval()(images)
            change = (images - flipped_images).abs().mean().item()
            print(f"| {name} | {batch_logits.mean().item():.2f} | {eval_logits.mean().item():.2f} | {change:.3f} |")
            Image.fromarray(grid_uint8(images[:64], nrow=8)).save(Path(args.out) / file)


if __name__ == "__main__":
    main()
