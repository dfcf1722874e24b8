"""`python -m dcgan_dist.explore --generator models:/dcgan-generator@champion`: the paper's
section 6 pictures for a registered generator (or the authors' own, `authors:PATH`), written
to --output-dir and logged to MLflow.

- samples.png: an 8x8 grid of samples.
- interpolation.png, walk.gif: spherical interpolation (slerp) between random latents, as rows
  and as an animated walk. Smooth transitions, rather than sharp jumps, are the paper's sign that
  G has not memorised (section 6.1).
- arithmetic.png: vector arithmetic on averaged latents (section 6.3; the paper averages three
  exemplars per concept because single latents are unstable). On the bundled digits there are no
  smiles or glasses, so the concept is stroke weight: for each digit class (as the digits
  classifier assigns them), the mean latent of its 3 thinnest and of its 3 thickest samples, and
  "thin + stroke vector", where the stroke vector (thick - thin) is averaged over the OTHER
  classes. If stroke weight is a direction in z, the third column is thicker than the first and
  still the same digit; arithmetic.json measures both (ink and class kept). For other data the
  concept is brightness over all samples.
Nothing is downloaded: G is rebuilt from the model's `architecture.json` and `state_dict.pt`
(or converted from the authors' .npy files, authors/weights.py). A G with no training run in the store
(`authors:`) gets its explore run in the experiment `explore`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dcgan_dist.util import OneLineErrorParser, grid_uint8, run_cli


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.explore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION (e.g. models:/dcgan-generator@champion), or authors:PATH (the authors' .npy folder)")
    parser.add_argument("--output-dir", default="explore", help="where the pictures go (default: ./explore)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument("--no-mlflow", action="store_true", help="write the pictures only; log no MLflow run")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch and MLflow load; main() parses again
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dcgan_dist.authors import weights as authors  # noqa: E402
from dcgan_dist.models import sample_latent  # noqa: E402
from dcgan_dist.tracking.registry import load_network  # noqa: E402
from dcgan_dist.tracking.store import TrackingError, check_reachable, ensure_experiment, resolve_tracking_uri  # noqa: E402

EXEMPLARS = 3  # latents averaged per concept, as in the paper
CANDIDATES = 2000  # samples generated to find each concept's exemplars


class ExploreError(RuntimeError):
    pass


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between latents a and b (rows), t in [0, 1]: it keeps the norm
    that a Gaussian or uniform latent typically has, where the straight line passes near 0."""
    cos = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    straight = (1 - t) * a + t * b
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin.clamp_min(1e-8)
    return torch.where(sin < 1e-6, straight, curved)


def to_picture(images: torch.Tensor, nrow: int) -> Image.Image:
    return Image.fromarray(grid_uint8(images, nrow))


@torch.no_grad()
def interpolations(generator, preset: str, rng: torch.Generator, rows: int = 8, steps: int = 10) -> Image.Image:
    a, b = sample_latent(rows, preset, rng=rng), sample_latent(rows, preset, rng=rng)
    z = torch.stack([slerp(a, b, t) for t in np.linspace(0, 1, steps)], dim=1).flatten(0, 1)  # row by row
    return to_picture(generator(z), nrow=steps)


@torch.no_grad()
def walk(generator, preset: str, rng: torch.Generator, keyframes: int = 5, frames_between: int = 12, grid: int = 16) -> list[Image.Image]:
    """A loop through `keyframes` latent batches, slerping between them: frames of a 4x4 grid."""
    keys = [sample_latent(grid, preset, rng=rng) for _ in range(keyframes)]
    frames = []
    for index in range(keyframes):
        a, b = keys[index], keys[(index + 1) % keyframes]
        for t in np.linspace(0, 1, frames_between, endpoint=False):
            frames.append(to_picture(generator(slerp(a, b, float(t))), nrow=4))
    return frames


def ink(images: torch.Tensor) -> torch.Tensor:
    """Mean brightness per image in [0, 1]: stroke weight for digits (white on black)."""
    return ((images + 1) / 2).flatten(1).mean(1)


@torch.no_grad()
def arithmetic(generator, preset: str, rng: torch.Generator, classifier=None) -> tuple[Image.Image, dict]:
    """Rows: per group (digit class, or all samples), G(mean z of thin), G(mean z of thick),
    G(mean z of thin + stroke vector of the other groups). Returns the picture and its measures."""
    z = sample_latent(CANDIDATES, preset, rng=rng)
    images = torch.cat([generator(z[i : i + 500]) for i in range(0, CANDIDATES, 500)])
    weight = ink(images)
    groups: dict[str, torch.Tensor] = {}
    if classifier is not None:
        _, probabilities = classifier.embed(images)
        label, confident = probabilities.argmax(1), probabilities.max(1) >= 0.9
        for digit in range(10):
            members = torch.from_numpy(np.flatnonzero(confident & (label == digit)))
            if len(members) >= 2 * EXEMPLARS:
                groups[str(digit)] = members
    if not groups:
        groups["all"] = torch.arange(CANDIDATES)
    thin, thick = {}, {}
    for name, members in groups.items():
        order = members[weight[members].argsort()]
        thin[name], thick[name] = z[order[:EXEMPLARS]].mean(0), z[order[-EXEMPLARS:]].mean(0)
    rows, kept, inks = [], [], {"thin": [], "thick": [], "thin_plus_stroke": []}
    for name in groups:
        others = [g for g in groups if g != name] or [name]
        stroke = torch.stack([thick[g] - thin[g] for g in others]).mean(0)
        row = generator(torch.stack([thin[name], thick[name], thin[name] + stroke]))
        rows.append(row)
        for key, value in zip(inks, ink(row).tolist()):
            inks[key].append(value)
        if classifier is not None and name != "all":
            kept.append(int(classifier.embed(row[2:])[1].argmax(1)[0]) == int(name))
    measures = {f"ink_{key}": float(np.mean(values)) for key, values in inks.items()} | {
        "groups": list(groups), "exemplars": EXEMPLARS,
    }
    if kept:
        measures["class_kept"] = float(np.mean(kept))
    return to_picture(torch.cat(rows), nrow=3), measures


def explore(uri: str, output_dir: Path, tracking_uri: str, seed: int = 0, log_to_mlflow: bool = True) -> dict[str, Path]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    if not uri.startswith(("models:/", authors.PREFIX)):
        raise ExploreError(f"--generator: expected models:/NAME@ALIAS, models:/NAME/VERSION or authors:PATH, got {uri!r}")
    try:
        loaded = load_network(uri, "generator", tracking_uri)
    except TrackingError as e:
        raise ExploreError(f"--generator {e}") from None
    generator, preset, source_run_id = loaded.network, loaded.architecture.preset, loaded.run_id
    source_run = client.get_run(source_run_id) if source_run_id else None
    classifier = None
    if source_run is not None and source_run.data.params.get("data.data") == "digits":
        from dcgan_dist.evaluate import backbones

        classifier = backbones.load("digits")

    output_dir.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    files = {name: output_dir / name for name in ("samples.png", "interpolation.png", "walk.gif", "arithmetic.png", "arithmetic.json")}
    with torch.no_grad():
        to_picture(generator(sample_latent(64, preset, rng=rng)), nrow=8).save(files["samples.png"])
    interpolations(generator, preset, rng).save(files["interpolation.png"])
    frames = walk(generator, preset, rng)
    frames[0].save(files["walk.gif"], save_all=True, append_images=frames[1:], duration=80, loop=0)
    picture, measures = arithmetic(generator, preset, rng, classifier)
    picture.save(files["arithmetic.png"])
    files["arithmetic.json"].write_text(json.dumps(measures, indent=2))

    if log_to_mlflow:
        tags = {"explore.model_uri": uri, "explore.source_run_id": source_run_id or ""}
        if source_run is not None:
            tags["mlflow.parentRunId"] = source_run_id  # shown under the run that trained the model
        experiment_id = source_run.info.experiment_id if source_run is not None else ensure_experiment(tracking_uri, "explore")
        run = client.create_run(experiment_id, run_name="explore", tags=tags)
        for path in files.values():
            client.log_artifact(run.info.run_id, str(path), artifact_path="explore")
        numbers = {f"arithmetic/{k}": v for k, v in measures.items() if isinstance(v, float)}
        for key, value in numbers.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        files["mlflow_run_id"] = run.info.run_id
    return files


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(parser.prog, lambda: explore_command(args), (ExploreError, TrackingError))


def explore_command(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    files = explore(args.generator, Path(args.output_dir), uri, args.seed, not args.no_mlflow)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
