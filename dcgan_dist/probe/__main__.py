"""`python -m dcgan_dist.probe`: the paper's linear probe of a trained discriminator (section 5.1,
Table 1: D features + an L2-SVM give 82.8 % on CIFAR-10, 73.8 % +/- 0.4 with 400 labels per class;
Table 2: 22.48 % test error on SVHN with 1,000 labels).

    python -m dcgan_dist.probe --discriminator models:/dcgan-discriminator@latest --dataset digits
    python -m dcgan_dist.probe --discriminator ray_results/run/checkpoint_000002 \\
        --dataset cifar10 --data-path cifar-10-python.tar.gz --output-json probe.json
    python -m dcgan_dist.probe --discriminator authors:../shared/authors-dcgan --dataset svhn --data-path svhn/

The protocol (protocol.py; the solvers: svm.py; the data sets and their splits: data.py):
- BatchNorm (`--bn-stats`): `running` = the statistics D kept in training; `reestimate` (the
  default for `authors:` weights, whose files hold none) = the authors' way, the mean over
  batches of 128 training images of each batch's mean and biased variance. D then runs in eval
  mode: an image's features do not depend on the other images of its batch.
- Features: the output of every conv block of D (after its BatchNorm and LeakyReLU), each
  max-pooled to a 4x4 grid, flattened and concatenated: 16 x (sum of D's conv widths)
  dimensions (28,672 for `imagenet32`, 7,168 for `svhn32`), held as `--feature-dtype`.
- A linear L2-SVM on the features as they are (the authors' LinearSVC, no scaling: their C
  range 1e-4 ... 1e-2 is for these), C from `--c-grid` (default C_GRID); `--solver torch` (the
  default: liblinear's objective solved in the primal on the features as held, svm.py) or
  `liblinear` (scikit-learn's LinearSVC itself).
- Few labels, the authors' draws: `--per-class` labelled training images per class; C chosen on
  `--draws-for-c` draws (the best mean validation accuracy), then `--draws` fresh draws scored
  with it: the mean and std of their test accuracies (`--same-draws`: those C was chosen on).
  Full: on CIFAR-10 and digits also one SVM per C on the whole training split, the best on
  validation scored on test.
- Baselines through the same protocol: the raw pixels (the image as D sees it) and a randomly
  initialised D of the same preset, size and BatchNorm placement (its statistics set alike).

Results go to MLflow as `probe/<dataset>/...` metrics of the training run the D came from (or a
new run in the experiment `probe` when that is unknown), with the JSON as an artifact.
Bad input (an unknown model URI or alias, a checkpoint that does not fit its preset, a data
path that is not the data set, no CUDA for `--device cuda`) exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from dcgan_dist.choices import BN_STATS, C_GRID, FEATURE_DTYPES, PRESETS, SVM_SOLVERS
from dcgan_dist.probe.data import DATASETS, DRAWS, DRAWS_FOR_C, ProbeError, Splits, check_data_path, load_digits_splits, load_splits
from dcgan_dist.util import OneLineErrorParser, redact, run_cli


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--discriminator", required=True, metavar="REF",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, a training checkpoint folder, or authors:PATH (the authors' .npy folder)")
    parser.add_argument("--dataset", required=True, choices=tuple(DATASETS))
    parser.add_argument("--data-path", metavar="PATH", help="cifar10: cifar-10-python.tar.gz or cifar-10-batches-py/; "
                        "svhn: the folder of train_32x32.mat and test_32x32.mat")
    parser.add_argument("--output-json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--preset", choices=PRESETS, help="fail unless D is of this preset")
    parser.add_argument("--per-class", type=int, help="labels per class of the few-labels protocol "
                        f"(default: {', '.join(f'{p.per_class} for {name}' for name, p in DATASETS.items())})")
    parser.add_argument("--draws-for-c", type=int, default=DRAWS_FOR_C, help="random draws of the few-labels protocol on which C "
                        "is chosen (default: %(default)s, as the authors)")
    parser.add_argument("--draws", type=int, default=DRAWS, help="fresh draws then scored with that C: their mean and std are "
                        "the result (default: %(default)s, as the authors)")
    parser.add_argument("--same-draws", action="store_true", help="score the draws C was chosen on instead (this probe's "
                        "earlier protocol; --draws is then unused)")
    parser.add_argument("--solver", default="torch", choices=SVM_SOLVERS, help="the L2-SVM's solver: torch (primal Newton on the "
                        "features as held, --device) or liblinear (scikit-learn's LinearSVC, a float64 copy) (default: %(default)s)")
    parser.add_argument("--c-grid", default=",".join(f"{c:g}" for c in C_GRID), metavar="C,C,...",
                        help="SVM C values to choose from on the validation split (default: %(default)s)")
    parser.add_argument("--bn-stats", choices=BN_STATS, help="D's BatchNorm statistics: those kept in training, or "
                        "re-estimated on the probe's training images (default: reestimate for authors:, running otherwise)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where D computes the features and the torch "
                        "solver fits (default: cpu)")
    parser.add_argument("--feature-dtype", default="float16", choices=FEATURE_DTYPES,
                        help="how the features are held (default: %(default)s, half the memory of float32)")
    parser.add_argument("--no-full-fit", action="store_true", help="skip the SVM on the whole training split (with --solver "
                        "liblinear about 20 bytes per feature value: 26 GB for CIFAR-10 at 28,672 dims); svhn never runs it")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI, the checkpoint's, or sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the results to MLflow")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch and MLflow load; main() parses again
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dcgan_dist.authors import weights as authors  # noqa: E402
from dcgan_dist.probe import protocol  # noqa: E402
from dcgan_dist.probe.protocol import Stages, SvmFits, extract_features, probe_feature_set, raw_pixels, set_bn_statistics  # noqa: E402
from dcgan_dist.tracking.registry import LoadedNetwork, load_network  # noqa: E402
from dcgan_dist.tracking.store import TrackingError, check_reachable, ensure_experiment, resolve_tracking_uri  # noqa: E402

__all__ = ["DATASETS", "ProbeError", "extract_features", "load_digits_splits", "main", "run_probe"]


def load_model(reference: str, tracking_uri: str) -> LoadedNetwork:
    """D from a registered model or a training checkpoint (ProbeError naming the problem)."""
    try:
        return load_network(reference, "discriminator", tracking_uri)
    except TrackingError as e:
        raise ProbeError(f"--discriminator {e}") from None


def run_probe(model: LoadedNetwork, splits: Splits, per_class: int, draws: tuple[int, int] = (DRAWS_FOR_C, DRAWS),
              c_grid: tuple[float, ...] = C_GRID, seed: int = 0, bn_stats: str = "running", device: str = "cpu",
              feature_dtype: str = "float32", with_full_fit: bool = True, solver: str = "torch",
              stages: Stages | None = None) -> dict[str, Any]:
    """The trained D, a random D of the same architecture and the raw pixels through the protocol;
    `draws`: (draws C is chosen on, fresh draws scored with it; 0 = score those C was chosen on);
    each stage's wall time and peak memory in `stages` (and the result's "stages")."""
    stages = stages or Stages()
    smallest = min(np.bincount(splits.train[1]))
    if per_class > smallest:
        raise ProbeError(f"--per-class {per_class}: the training split has only {smallest} images of its rarest class")
    torch.manual_seed(seed)
    _, random_d = model.architecture.build()
    dtype = protocol.FEATURE_DTYPES[feature_dtype]  # the name's numpy type
    with stages.timed("both D", f"BatchNorm statistics: {bn_stats}"):
        for discriminator in (model.network, random_d):
            set_bn_statistics(discriminator, splits.train[0], bn_stats, device)
    feature_sets = {
        "discriminator": lambda images: extract_features(model.network, images, device=device, dtype=dtype),
        "random_d": lambda images: extract_features(random_d, images, device=device, dtype=dtype),
        "raw_pixels": lambda images: raw_pixels(images, dtype),
    }
    fits = SvmFits(solver, device)
    results: dict[str, Any] = {name: probe_feature_set(name, featurize, splits, per_class, *draws, c_grid, with_full_fit, fits, stages)
                               for name, featurize in feature_sets.items()}
    results["svm_fits"], results["stages"] = fits.counts(), stages.rows
    results["protocol"] = {"bn_stats": bn_stats, "feature_dtype": feature_dtype, "c_grid": list(c_grid), "solver": solver,
                           "per_class": per_class, "draws_for_c": draws[0], "draws": draws[1] or draws[0], "fresh_draws": bool(draws[1])}
    return results


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The --output-json document (accuracies as fractions; the few-labels result named by its count)."""
    trained, per_class = results["discriminator"], results["protocol"]["per_class"]
    few = trained["few"]
    return {
        "accuracy": trained.get("accuracy"),  # None where the data set's protocol has no full fit (SVHN)
        f"accuracy_{per_class}": {"mean": few["mean"], "std": few["std"], "C": few["C"]},
        f"test_error_{per_class}": {"mean": 1.0 - few["mean"], "std": few["std"]},
        "feature_dims": trained["dims"],
        "baselines": {name: {"accuracy": results[name].get("accuracy"), f"accuracy_{per_class}": results[name]["few"]["mean"]}
                      for name in ("raw_pixels", "random_d")},
        "protocol": results["protocol"],
        "svm_fits": results["svm_fits"],
        "stages": results["stages"],
    }


def table(results: dict[str, Any]) -> str:
    protocol = results["protocol"]
    scored = f"{protocol['draws']} fresh draws" if protocol["fresh_draws"] else f"{protocol['draws']} draws"
    lines = [f"| features | dims | accuracy (C) | {protocol['per_class']} per class, {scored} (C on {protocol['draws_for_c']}) | test error |",
             "|---|---|---|---|---|"]
    for name, label in (("discriminator", "trained D"), ("random_d", "random D"), ("raw_pixels", "raw pixels")):
        r, few = results[name], results[name]["few"]
        full = f"{r['accuracy']:.2%} ({r['C']:g})" if "accuracy" in r else "-"
        lines.append(f"| {label} | {r['dims']:,} | {full} | {few['mean']:.2%} +/- {few['std']:.2%} ({few['C']:g}) "
                     f"| {1 - few['mean']:.2%} |")
    return "\n".join(lines)


def stage_table(stages: list[dict[str, Any]]) -> str:
    """What each stage cost: wall seconds and the peak resident memory while it ran."""
    lines = ["| feature set | stage | wall s | peak RSS GB |", "|---|---|---:|---:|"]
    lines += [f"| {row['feature_set']} | {row['stage']} | {row['seconds']:,.1f} | {row['peak_rss_gb']:.2f} |" for row in stages]
    lines += [f"The probe's peak resident memory: {stages[-1]['process_peak_rss_gb']:.2f} GB"] if stages else []
    return "\n".join(lines)


def mlflow_metrics(doc: dict[str, Any], dataset: str) -> dict[str, float]:
    """`probe/<dataset>/...`: the few-labels metrics named by their count, as in the JSON."""
    prefix, per_class = f"probe/{dataset}", doc["protocol"]["per_class"]
    few = doc[f"accuracy_{per_class}"]
    values = {f"{prefix}/accuracy_{per_class}_mean": few["mean"], f"{prefix}/accuracy_{per_class}_std": few["std"],
              f"{prefix}/test_error_{per_class}_mean": 1.0 - few["mean"], f"{prefix}/feature_dims": doc["feature_dims"]}
    if doc["accuracy"] is not None:
        values[f"{prefix}/accuracy"] = doc["accuracy"]
    for name, baseline in doc["baselines"].items():
        values[f"{prefix}/{name}_{per_class}"] = baseline[f"accuracy_{per_class}"]
        if baseline["accuracy"] is not None:
            values[f"{prefix}/{name}"] = baseline["accuracy"]
    return values


def log_to_mlflow(model: LoadedNetwork, reference: str, dataset: str, tracking_uri: str, results: dict[str, Any]) -> str:
    """Metrics `probe/<dataset>/...` on the D's training run (at the D's step), or on a new run
    of the experiment `probe` tagged with the D when that run is not in this store. A registered
    D's metrics are also linked to its LoggedModel (`model_id`) and set as tags
    `probe.<dataset>.<metric>` of its version; the solver, and any fit that did not converge, as run tags."""
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
    doc, version = summary(results), registered_version(client, reference)
    model_id = logged_model_id(version)
    timestamp = mlflow.utils.time.get_current_time_millis()
    metrics = mlflow_metrics(doc, dataset)
    client.log_batch(run_id, metrics=[Metric(key, value, timestamp, model.step, model_id=model_id) for key, value in metrics.items()])
    fits = results["svm_fits"]
    client.set_tag(run_id, f"probe.{dataset}.svm_solver", fits["solver"])
    if fits["not_converged"]:
        client.set_tag(run_id, f"probe.{dataset}.svm_not_converged", f"{fits['not_converged']} of {fits['fits']}")
    if version is not None:  # the registry page of the version shows its numbers
        for key, value in metrics.items():
            client.set_model_version_tag(version.name, version.version, key.replace("/", "."), f"{value:.6g}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, f"{dataset}.json")
        path.write_text(json.dumps(results | {"summary": doc, "discriminator": redact(reference)}, indent=2))
        client.log_artifact(run_id, str(path), artifact_path="probe")
    return run_id


def registered_version(client, reference: str):
    """The ModelVersion of a `models:/NAME/VERSION` or `models:/NAME@ALIAS` reference; None for others."""
    if not reference.startswith("models:/"):
        return None
    path = reference.removeprefix("models:/")
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, version = path.rsplit("/", 1)
    return client.get_model_version(name, version)


def logged_model_id(version) -> str | None:
    """The LoggedModel (MLflow 3) a version was registered from: its `model_id`, or, where the
    server leaves that empty, the id in its source `models:/<model id>`."""
    if version is None:
        return None
    source = version.source or ""
    from_source = source.removeprefix("models:/") if source.startswith("models:/") and "/" not in source.removeprefix("models:/") else None
    return getattr(version, "model_id", None) or from_source


def parse_c_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(value) for value in text.split(","))
    except ValueError:
        raise ProbeError(f"--c-grid: expected numbers separated by commas (got {text!r})") from None
    if not all(value > 0 for value in values):
        raise ProbeError(f"--c-grid: every C must be > 0 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(parser.prog, lambda: probe_command(args), (ProbeError, TrackingError))


def probe_command(args: argparse.Namespace) -> int:
    protocol = DATASETS[args.dataset]
    per_class = args.per_class or protocol.per_class
    if per_class < 1 or args.draws_for_c < 1 or args.draws < 1:
        raise ProbeError(f"--per-class, --draws-for-c and --draws must be >= 1 (got {per_class}, {args.draws_for_c}, {args.draws})")
    c_grid = parse_c_grid(args.c_grid)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    bn_stats = args.bn_stats or ("reestimate" if args.discriminator.startswith(authors.PREFIX) else "running")
    check_data_path(args.dataset, args.data_path)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    if args.discriminator.startswith("models:/") or not args.no_mlflow:
        check_reachable(tracking_uri)
    model = load_model(args.discriminator, tracking_uri)
    if not args.tracking_uri and model.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri = model.tracking_uri  # where the checkpoint's own run lives
    arch = model.architecture
    if args.preset and arch.preset != args.preset:
        raise ProbeError(f"--discriminator {args.discriminator}: a D of preset {arch.preset!r}, not --preset {args.preset!r}")
    stages = Stages()
    with stages.timed("all", f"load {args.dataset}"):
        splits = load_splits(args.dataset, args.data_path, arch.image_size)
    draws = (args.draws_for_c, 0 if args.same_draws else args.draws)
    results = run_probe(model, splits, per_class, draws, c_grid, bn_stats=bn_stats, device=args.device, feature_dtype=args.feature_dtype,
                        with_full_fit=protocol.full_fit and not args.no_full_fit, solver=args.solver, stages=stages)

    print(f"\nL2-SVM probe on {args.dataset}: D {redact(args.discriminator)} ({arch.preset}, {arch.image_size} px, "
          f"bn {arch.bn}, step {model.step}); BatchNorm statistics: {bn_stats}; features {args.feature_dtype} on {args.device}")
    print(table(results))
    fits = results["svm_fits"]
    print(f"\n{fits['fits']} SVM fits ({fits['solver']}, {fits['iterations']:,} iterations); the stages:\n{stage_table(results['stages'])}")
    if fits["not_converged"]:
        print(f"warning: {fits['not_converged']} of {fits['fits']} SVM fits ({fits['solver']}) stopped at their iteration "
              "limit before converging", file=sys.stderr)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary(results), indent=2))
    if not args.no_mlflow:
        run_id = log_to_mlflow(model, args.discriminator, args.dataset, tracking_uri, results)
        print(f"Logged to MLflow run {run_id} ({redact(tracking_uri)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
