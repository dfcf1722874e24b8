"""`python -m dcgan_dist.evaluate --generator URI --backbone fid-inception --inception-weights FILE
--samples 10000 --real MANIFEST_OR_DATASET --output-json scores.json`: score a generator offline.

The generator is any the registry loads: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a training
checkpoint folder, or the authors' released weights (`authors:PATH`). It draws --samples images
from fixed latents (--seed); FID, KID and (fid-inception) the Inception Score are computed against
--real-samples real images (default: as many as --samples) read as training reads them, as
StudioGAN and torch-fidelity report them: with `--backbone fid-inception` and the
pt_inception-2015-12-05 weights, the numbers compare with published ones at the same counts.
KID uses torch-fidelity's 100 subsets of 1,000. `--save-samples DIR` writes the samples as PNGs
(so torch-fidelity or pytorch-fid can score the same images); `--memorisation-against SOURCE`
finds each sample's nearest image in the whole of SOURCE, streamed (evaluate/memorisation.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dcgan_dist.choices import BACKBONES
from dcgan_dist.util import OneLineErrorParser, run_cli

PROG = "python -m dcgan_dist.evaluate"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint folder, or authors:PATH")
    parser.add_argument("--backbone", default="fid-inception", choices=BACKBONES,
                        help="feature network (default: fid-inception, the one published FIDs use)")
    parser.add_argument("--inception-weights", default="", metavar="FILE",
                        help="weights of the inception backbones: pt_inception-2015-12-05-*.pth for fid-inception (never downloaded)")
    parser.add_argument("--samples", type=int, default=10000, help="generated images (default 10000; StudioGAN reports 50000)")
    parser.add_argument("--real", required=True, metavar="MANIFEST_OR_DATASET", help="real images: a shard manifest or a bundled data set (digits)")
    parser.add_argument("--real-samples", type=int, default=0, help="real images (default: as many as --samples, at most the set's)")
    parser.add_argument("--output-json", required=True, metavar="FILE", help="where the scores go")
    parser.add_argument("--save-samples", default="", metavar="DIR", help="also write the samples there as PNGs")
    parser.add_argument("--memorisation-against", default="", metavar="MANIFEST_OR_DATASET",
                        help="the training set: each sample's nearest image in all of it (streamed), pictures next to --output-json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and of the real images' order")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes reading shards (default 0: this process)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI for models:/ (empty = MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch and MLflow load; main() parses again
    build_parser().parse_args()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dcgan_dist.authors import weights as authors  # noqa: E402
from dcgan_dist.config import Config  # noqa: E402
from dcgan_dist.data.manifest import ManifestError  # noqa: E402
from dcgan_dist.data.s3 import StorageError  # noqa: E402
from dcgan_dist.evaluate import backbones  # noqa: E402
from dcgan_dist.evaluate.evaluator import Evaluator, read_real_images  # noqa: E402
from dcgan_dist.evaluate.memorisation import memorisation_check  # noqa: E402
from dcgan_dist.tracking.store import TrackingError  # noqa: E402

KID_SUBSETS = (100, 1000)  # torch-fidelity's defaults (kid_subsets, kid_subset_size)
MEMORISATION_REAL = 1000  # real images whose nearest other training image is the baseline


class EvaluateError(ValueError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error(f"--samples must be >= 10 (got {args.samples})")
    return args


def load_generator(uri: str, tracking_uri: str, device: torch.device):
    from dcgan_dist.tracking.registry import load_network
    from dcgan_dist.tracking.store import check_reachable, resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri)
    if uri.startswith("models:/"):
        check_reachable(store)
    elif not uri.startswith(authors.PREFIX) and not Path(uri).expanduser().exists():
        raise EvaluateError(f"--generator: expected models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint folder or authors:PATH, got {uri!r}")
    try:
        loaded = load_network(uri, "generator", store)
    except TrackingError as e:
        raise EvaluateError(f"--generator {e}") from None
    return loaded.network.to(device), loaded.architecture


def real_config(source: str, image_size: int, seed: int, loader_workers: int) -> tuple[Config, int]:
    """The config training would read `source` with, and how many images it has."""
    from dcgan_dist import data
    from dcgan_dist.data import manifest

    cfg = Config()
    cfg.data.data, cfg.model.image_size, cfg.loop.seed, cfg.data.loader_workers = source, image_size, seed, loader_workers
    if source in data.SOURCES:
        return cfg, len(data.open_dataset(source, image_size))
    if not manifest.is_manifest_url(source):
        raise EvaluateError(f"{source!r} is neither a bundled data set ({', '.join(data.SOURCES)}) nor a manifest (.json)")
    shards = manifest.read(source)
    if shards.image_size != image_size and not shards.original_size:  # indexed shards are resized as they are read
        raise EvaluateError(f"{source}: its images are {shards.image_size} px, the generator's {image_size} px")
    return cfg, shards.num_samples


def save_samples(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:06d}.png")


def evaluate_command(args: argparse.Namespace) -> int:
    from dcgan_dist import data

    device = torch.device(args.device)
    generator, architecture = load_generator(args.generator, args.tracking_uri, device)
    backbone = backbones.load(args.backbone, args.inception_weights, device)
    cfg, available = real_config(args.real, architecture.image_size, args.seed, args.loader_workers)
    real = read_real_images(cfg, min(args.real_samples or args.samples, available))
    evaluator = Evaluator(backbone, real, real[:0], args.samples, architecture.preset, args.seed, KID_SUBSETS)
    images = evaluator.generate(generator)
    scores = {name.removeprefix("eval/"): value for name, value in evaluator.score(images).items()}
    report = {"generator": args.generator, "backbone": backbone.name, "samples": len(images), "real": args.real,
              "real_samples": len(real), "seed": args.seed, "kid_subsets": list(KID_SUBSETS)} | scores
    output = Path(args.output_json)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.save_samples:
        save_samples(images, Path(args.save_samples))
        report["saved_samples"] = args.save_samples
    if args.memorisation_against:
        real_config(args.memorisation_against, architecture.image_size, args.seed, args.loader_workers)  # a bad source fails now
        training = data.every_image(args.memorisation_against, architecture.image_size, loader_workers=args.loader_workers)
        metrics, pictures = memorisation_check(images, training, real[:MEMORISATION_REAL], device=device)
        report["memorisation"] = {"against": args.memorisation_against} | metrics
        for name, picture in pictures.items():
            path = output.with_name(f"{output.stem}_memorisation_{name}.png")
            Image.fromarray(picture).save(path)
            report["memorisation"][f"{name}_picture"] = str(path)
    output.write_text(json.dumps(report, indent=2))
    for name, value in scores.items():
        print(f"{name}: {value:.6g}")
    print(f"{backbone.name}, {len(images)} samples vs {len(real)} real: {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    known = (EvaluateError, TrackingError, backbones.BackboneError, ManifestError, StorageError)
    return run_cli(PROG, lambda: evaluate_command(args), known)


if __name__ == "__main__":
    sys.exit(main())
