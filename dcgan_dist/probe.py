"""`python -m dcgan_dist.probe`: the paper's linear probe of a trained discriminator (section 5.1,
Table 1: D features + an L2-SVM give 82.8 % on CIFAR-10, 73.8 % +/- 0.4 with 400 labels per class).

    python -m dcgan_dist.probe --discriminator models:/dcgan-discriminator@latest --dataset digits
    python -m dcgan_dist.probe --discriminator ray_results/run/checkpoint_000002 \\
        --dataset cifar10 --data-path cifar-10-python.tar.gz --output-json probe.json

The protocol:
- Features: the output of every conv block of D (after its BatchNorm and LeakyReLU), each
  max-pooled to a 4x4 grid (adaptive max pooling), flattened and concatenated:
  16 x (sum of D's conv widths) dimensions (28,672 for `imagenet32`).
- BatchNorm: D runs in eval mode, so BN uses the running statistics it kept while training
  (over real and generated batches alike). An image's features then do not depend on the
  other images of its batch.
- Features are centred on the training split's mean and scaled to unit length per image
  (StandardScaler(with_std=False), Normalizer()): per-feature standardisation blows up the
  near-constant features of max-pooled LeakyReLUs and made liblinear crawl, for no gain.
- A linear L2-SVM: scikit-learn's LinearSVC(loss="squared_hinge"), one-vs-rest. C is chosen from
  `--c-grid` (default C_GRID) by accuracy on a held-out validation split (the SVM fit on the
  training split); the chosen SVM's accuracy on the test split is reported.
- The few-labels protocol: `--per-class` labelled images of each class (400 for CIFAR-10, as
  the paper; 50 for digits, which has about 100 per class in its training split) drawn from the
  training split, `--subsets` times with different seeds; C chosen on the same validation
  split each time; mean and std of the test accuracies.
- Baselines through the same protocol: the raw pixels (the image as D sees it) and a randomly
  initialised D of the same preset, size and BatchNorm placement.
- Splits: CIFAR-10: data_batch_1..5 (the last 5,000 of a fixed shuffle held out for
  validation) and test_batch. Digits: a fixed stratified split of the 1,797 images: 30 % test,
  15 % validation, the rest training.

Results go to MLflow as `probe/<dataset>/...` metrics of the training run the D came from (or a
new run in the experiment `probe` when that is unknown), with the JSON as an artifact.
Bad input (an unknown model URI or alias, a checkpoint that does not fit its preset, a data
path that is not the CIFAR-10 archive) exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from dcgan_dist.config import OneLineErrorParser
from dcgan_dist.data.digits import digits_dataset
from dcgan_dist.data.sources import cifar10
from dcgan_dist.models import PRESETS, Discriminator
from dcgan_dist.tracking.registry import LoadedNetwork, load_network
from dcgan_dist.tracking.store import TrackingError, check_reachable, ensure_experiment, resolve_tracking_uri
from dcgan_dist.util import redact, run_cli

C_GRID = (0.1, 1.0, 10.0)  # for unit-length feature vectors
POOLED_SIDE = 4  # every block's features are max-pooled to 4x4
CIFAR_VALIDATION = 5000
DEFAULT_PER_CLASS = {"cifar10": 400, "digits": 50}


class ProbeError(ValueError):
    """Bad input, named in one line (exit code 2)."""


@torch.no_grad()
def extract_features(discriminator: Discriminator, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, feature_dims) float32: each conv block max-pooled to 4x4, flattened, concatenated."""
    discriminator.eval()  # BatchNorm uses its running statistics
    chunks = []
    for start in range(0, len(images), batch_size):
        blocks = discriminator.features(images[start : start + batch_size])
        chunks.append(torch.cat([F.adaptive_max_pool2d(b, POOLED_SIDE).flatten(1) for b in blocks], 1).numpy())
    return np.concatenate(chunks)


# ---------------------------------------------------------------- data


@dataclass
class Splits:
    """Images in [-1, 1] (N, 3, S, S) and integer labels, per split."""

    train: tuple[torch.Tensor, np.ndarray]
    val: tuple[torch.Tensor, np.ndarray]
    test: tuple[torch.Tensor, np.ndarray]


def _cifar_images(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """N x 32 x 32 x 3 uint8 -> N x 3 x S x S in [-1, 1]."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if image_size != 32:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return images


def load_cifar10(path: Path, image_size: int) -> Splits:
    try:
        train_pixels, train_labels = cifar10.read_split(path, "train")
        test_pixels, test_labels = cifar10.read_split(path, "test")
    except cifar10.CifarError as e:
        raise ProbeError(f"--data-path {e}") from None
    images = _cifar_images(train_pixels, image_size)
    order = np.random.default_rng(0).permutation(len(train_labels))
    held_out = min(CIFAR_VALIDATION, len(train_labels) // 10)  # 10 % of a small (test) archive
    val, train = order[:held_out], order[held_out:]
    return Splits((images[train], train_labels[train]), (images[val], train_labels[val]),
                  (_cifar_images(test_pixels, image_size), test_labels))


def load_digits_splits(image_size: int) -> Splits:
    from sklearn.datasets import load_digits

    images = digits_dataset(image_size).tensors[0]
    labels = load_digits().target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.30, stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=0.15 / 0.70, stratify=labels[rest], random_state=0)
    return Splits((images[train], labels[train]), (images[val], labels[val]), (images[test], labels[test]))


# ---------------------------------------------------------------- the discriminator


def load_model(reference: str, tracking_uri: str) -> LoadedNetwork:
    """D from a registered model or a training checkpoint (ProbeError naming the problem)."""
    try:
        return load_network(reference, "discriminator", tracking_uri)
    except TrackingError as e:
        raise ProbeError(f"--discriminator {e}") from None


# ---------------------------------------------------------------- the SVM


def fit_and_test(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], c_grid: tuple[float, ...], counter: dict[str, int]) -> tuple[float, float]:
    """(test accuracy, chosen C): an L2-SVM per C on `train`, the best on `val` scored on `test`."""
    best = (-1.0, None, None)
    for c in c_grid:
        svm = make_pipeline(StandardScaler(with_std=False), Normalizer(),
                            LinearSVC(C=c, loss="squared_hinge", random_state=0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svm.fit(*train)
        counter["not_converged"] += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        counter["fits"] += 1
        val_accuracy = svm.score(*val)
        if val_accuracy > best[0]:
            best = (val_accuracy, c, svm)
    return float(best[2].score(*test)), float(best[1])


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), per_class, replace=False) for k in np.unique(labels)])


def probe_features(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], per_class: int, subsets: int,
                   c_grid: tuple[float, ...], counter: dict[str, int]) -> dict[str, Any]:
    """The full protocol for one feature set (features[split], labels[split])."""
    val, test = (features["val"], labels["val"]), (features["test"], labels["test"])
    accuracy, c = fit_and_test((features["train"], labels["train"]), val, test, c_grid, counter)
    few = []
    for seed in range(subsets):
        chosen = per_class_subset(labels["train"], per_class, seed)
        few.append(fit_and_test((features["train"][chosen], labels["train"][chosen]), val, test, c_grid, counter)[0])
    return {"accuracy": accuracy, "C": c, "few": {"mean": float(np.mean(few)), "std": float(np.std(few))},
            "dims": features["train"].shape[1]}


def run_probe(model: LoadedNetwork, splits: Splits, per_class: int, subsets: int, c_grid: tuple[float, ...] = C_GRID,
              seed: int = 0) -> dict[str, Any]:
    """The trained D, a random D of the same architecture and the raw pixels through the protocol."""
    labels = {split: getattr(splits, split)[1] for split in ("train", "val", "test")}
    smallest = min(np.bincount(labels["train"]))
    if per_class > smallest:
        raise ProbeError(f"--per-class {per_class}: the training split has only {smallest} images of its rarest class")
    torch.manual_seed(seed)
    _, random_d = model.architecture.build()
    feature_sets = {
        "discriminator": lambda images: extract_features(model.network, images),
        "random_d": lambda images: extract_features(random_d, images),
        "raw_pixels": lambda images: images.flatten(1).numpy(),
    }
    counter = {"fits": 0, "not_converged": 0}
    results = {}
    for name, featurize in feature_sets.items():
        features = {split: featurize(getattr(splits, split)[0]) for split in ("train", "val", "test")}
        results[name] = probe_features(features, labels, per_class, subsets, c_grid, counter)
    results["svm_fits"] = counter
    return results


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The --output-json document (accuracies as fractions)."""
    trained = results["discriminator"]
    return {
        "accuracy": trained["accuracy"],
        "accuracy_400": trained["few"],
        "feature_dims": trained["dims"],
        "baselines": {"raw_pixels": results["raw_pixels"]["accuracy"], "random_d": results["random_d"]["accuracy"]},
    }


def table(results: dict[str, Any], per_class: int, subsets: int) -> str:
    lines = [f"| features | dims | accuracy | {per_class} per class ({subsets} subsets) | C |", "|---|---|---|---|---|"]
    for name, label in (("discriminator", "trained D"), ("random_d", "random D"), ("raw_pixels", "raw pixels")):
        r = results[name]
        lines.append(f"| {label} | {r['dims']:,} | {r['accuracy']:.2%} | {r['few']['mean']:.2%} +/- {r['few']['std']:.2%} | {r['C']:g} |")
    return "\n".join(lines)


def log_to_mlflow(model: LoadedNetwork, reference: str, dataset: str, tracking_uri: str, results: dict[str, Any],
                  per_class: int) -> str:
    """Metrics `probe/<dataset>/...` on the D's training run (at the D's step), or on a new run
    of the experiment `probe` tagged with the D when that run is not in this store."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    run_id = model.run_id
    if run_id is not None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None
    if run_id is None:
        experiment_id = ensure_experiment(tracking_uri, "probe")
        run_id = client.create_run(experiment_id, run_name=f"probe-{dataset}", tags={
            "probe.discriminator": redact(reference), "probe.source_run_id": model.run_id or ""}).info.run_id
        client.set_terminated(run_id)
    doc = summary(results)
    prefix = f"probe/{dataset}"
    values = {
        f"{prefix}/accuracy": doc["accuracy"], f"{prefix}/accuracy_{per_class}_mean": doc["accuracy_400"]["mean"],
        f"{prefix}/accuracy_{per_class}_std": doc["accuracy_400"]["std"], f"{prefix}/feature_dims": doc["feature_dims"],
        f"{prefix}/raw_pixels": doc["baselines"]["raw_pixels"], f"{prefix}/random_d": doc["baselines"]["random_d"],
    }
    timestamp = mlflow.utils.time.get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(key, value, timestamp, model.step) for key, value in values.items()])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, f"{dataset}.json")
        path.write_text(json.dumps(results | {"summary": doc, "discriminator": redact(reference)}, indent=2))
        client.log_artifact(run_id, str(path), artifact_path="probe")
    return run_id


def parse_c_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        raise ProbeError(f"--c-grid: expected numbers separated by commas (got {text!r})") from None
    if not all(value > 0 for value in values):
        raise ProbeError(f"--c-grid: every C must be > 0 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--discriminator", required=True, metavar="REF",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, a training checkpoint folder, or authors:PATH (the authors' .npy folder)")
    parser.add_argument("--dataset", required=True, choices=("cifar10", "digits"))
    parser.add_argument("--data-path", metavar="PATH", help="cifar10: cifar-10-python.tar.gz or cifar-10-batches-py/")
    parser.add_argument("--output-json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="fail unless D is of this preset")
    parser.add_argument("--per-class", type=int, help="labels per class of the few-labels protocol (default: 400 for cifar10, 50 for digits)")
    parser.add_argument("--subsets", type=int, default=5, help="random subsets for the few-labels protocol (default: 5)")
    parser.add_argument("--c-grid", default=",".join(f"{c:g}" for c in C_GRID), metavar="C,C,...",
                        help="SVM C values to choose from on the validation split (default: %(default)s)")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI, the checkpoint's, or sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the results to MLflow")
    args = parser.parse_args(argv)
    return run_cli(parser.prog, lambda: probe_command(args), (ProbeError, TrackingError))


def probe_command(args: argparse.Namespace) -> int:
    per_class = args.per_class or DEFAULT_PER_CLASS[args.dataset]
    if per_class < 1 or args.subsets < 1:
        raise ProbeError(f"--per-class and --subsets must be >= 1 (got {per_class}, {args.subsets})")
    c_grid = parse_c_grid(args.c_grid)
    if args.dataset == "cifar10" and not args.data_path:
        raise ProbeError("--data-path: cifar10 needs the path of cifar-10-python.tar.gz")
    if args.dataset == "digits" and args.data_path:
        raise ProbeError("--data-path: digits are bundled with scikit-learn; give no path")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    if args.discriminator.startswith("models:/") or not args.no_mlflow:
        check_reachable(tracking_uri)
    model = load_model(args.discriminator, tracking_uri)
    if not args.tracking_uri and model.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri = model.tracking_uri  # where the checkpoint's own run lives
    arch = model.architecture
    if args.preset and arch.preset != args.preset:
        raise ProbeError(f"--discriminator {args.discriminator}: a D of preset {arch.preset!r}, not --preset {args.preset!r}")
    splits = (load_cifar10(Path(args.data_path).expanduser(), arch.image_size) if args.dataset == "cifar10"
              else load_digits_splits(arch.image_size))
    results = run_probe(model, splits, per_class, args.subsets, c_grid)

    print(f"\nL2-SVM probe on {args.dataset}: D {redact(args.discriminator)} ({arch.preset}, "
          f"{arch.image_size} px, bn {arch.bn}, step {model.step}); BatchNorm in eval mode (running statistics)")
    print(table(results, per_class, args.subsets))
    fits = results["svm_fits"]
    if fits["not_converged"]:
        print(f"{fits['not_converged']} of {fits['fits']} SVM fits stopped at max_iter before converging")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary(results), indent=2))
    if not args.no_mlflow:
        run_id = log_to_mlflow(model, args.discriminator, args.dataset, tracking_uri, results, per_class)
        print(f"Logged to MLflow run {run_id} ({redact(tracking_uri)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
