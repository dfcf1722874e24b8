"""`python -m dcgan_dist.register --storage-path P --run-name N`: log and register the final models
of a finished training from its last checkpoint.

For a run whose tracking server was away when it ended: training succeeded and the models are
in the checkpoint, but not in MLflow. This first delivers what the run spilled into its storage
(the metrics, tags and images the server missed, with their steps and timestamps; once), then
puts the models where the end of training would have (the same run, `dcgan-generator`/
`dcgan-discriminator` versions, the `champion` alias on the best snapshot) and ends the run
FINISHED. Re-running the training command does the same.
"""

from __future__ import annotations

import argparse
import sys

# torch, Ray and MLflow load after parsing (in the functions below): --help and a bad flag answer at once.
from dcgan_dist.util import OneLineErrorParser, first_line, redact, run_cli

PROG = "python -m dcgan_dist.register"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage-path", required=True, help="the training's --storage-path (a folder or s3://bucket/prefix)")
    parser.add_argument("--run-name", required=True, help="the training's --run-name")
    parser.add_argument("--tracking-uri", default="", help="the MLflow store (default: the one the run was tracked in)")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from dcgan_dist.tracking.store import TrackingError

    return run_cli(PROG, lambda: register(args.storage_path, args.run_name, args.tracking_uri), (TrackingError,))


def last_checkpoint_state(storage_path: str, run_name: str) -> dict:
    """The state of the run's newest readable checkpoint (an unreadable latest one falls back
    to the one before, as a resume would)."""
    import ray.train

    from dcgan_dist.restore import RestoreError, newest_readable, older_checkpoints
    from dcgan_dist.tracking.store import TrackingError
    from dcgan_dist.train import storage

    where = storage(storage_path)
    path = f"{where['storage_path'].rstrip('/')}/{run_name}"
    try:
        latest = ray.train.Result.from_path(path, storage_filesystem=where.get("storage_filesystem")).checkpoint
    except Exception as e:  # noqa: BLE001 - a missing folder, or no Ray Train run there
        raise TrackingError(f"--storage-path {redact(storage_path)} --run-name {run_name}: no Ray Train run there "
                            f"({first_line(e)})") from None
    if latest is None:
        raise TrackingError(f"--storage-path {redact(storage_path)} --run-name {run_name}: the run has no checkpoint")
    try:
        return newest_readable([latest, *older_checkpoints(latest)])[1]
    except RestoreError as e:
        raise TrackingError(f"run {run_name}: {e}") from None


def register(storage_path: str, run_name: str, tracking_uri: str = "") -> int:
    from mlflow import MlflowClient

    from dcgan_dist import checkpoint, evaluate
    from dcgan_dist.champion import holds_final_models, log_final_models
    from dcgan_dist.tracking import store
    from dcgan_dist.tracking.run_logger import RunLogger
    from dcgan_dist.tracking.spill import Spill
    from dcgan_dist.tracking.store import TrackingError
    from dcgan_dist.tracking.training_run import deliver_spilled
    from dcgan_dist.train import storage

    state = last_checkpoint_state(storage_path, run_name)
    config = state.get("config", {})
    step, max_steps = int(state["step"]), int(config.get("loop.max_steps", state["step"]))
    uri = store.resolve_tracking_uri(tracking_uri or config.get("tracking.tracking_uri", ""))
    store.check_reachable(uri)
    run_id = state.get("mlflow_run_id")
    if not run_id:
        raise TrackingError(f"the checkpoint of run {run_name} names no MLflow run")
    spill = Spill.for_storage(storage(storage_path), run_name)
    counts = deliver_spilled(spill, MlflowClient(uri), run_id)
    print(f"Delivered {counts['metrics']} metrics, {counts['tags']} tags and {counts['images']} images that MLflow run {run_id} "
          f"missed (from {redact(spill.where(run_id))})")
    if step < max_steps:
        raise TrackingError(f"run {run_name} stopped at step {step} of --max-steps {max_steps}: it has not finished; "
                            "re-run the training command to continue it (it registers the models at the end)")
    logger = RunLogger(uri, config.get("tracking.experiment", "Default"), "", run_id, system_metrics=False, spill=spill)
    if holds_final_models(logger, step):
        logger.finish()
        print(f"MLflow run {run_id} already holds the models of step {step}: nothing to do")
        return 0
    architecture = checkpoint.architecture_of(state)
    generator, discriminator = architecture.build()
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    versions = log_final_models(logger, architecture, generator, discriminator, step, evaluate.Best.from_state(state.get("best")),
                                logger.tags().get("eval.backbone", ""), register=True)
    logger.finish()
    print(f"Registered the models of step {step} into MLflow run {run_id} ({redact(uri)}): "
          + ", ".join(f"{name} version {version}" for name, version in sorted(versions.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
