"""`python -m dcgan_dist.train`: train the DCGAN with Ray Train, tracked in MLflow.

Parse the config, check everything that can be checked (values, data, MLflow store, storage
path) before any Ray worker starts, then run `TorchTrainer.fit()`. With no flags: a local Ray
instance, one worker, the bundled digits, and an MLflow store in ./mlflow.db. Re-running with
the same --run-name and --storage-path resumes from the latest checkpoint, into the same
MLflow run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from dcgan_dist import config
from dcgan_dist.config import Config, ConfigError
from dcgan_dist.util import redact, run_cli

PROG = "python -m dcgan_dist.train"
if __name__ == "__main__":  # --help, a bad flag or value answer before torch, Ray and MLflow load (~1 GB, seconds); main() parses again
    config.parse(None, PROG, __doc__.split("\n\n")[0])

from dcgan_dist import data, placement  # noqa: E402
from dcgan_dist.data import manifest, s3  # noqa: E402
from dcgan_dist.tracking import store, training_run  # noqa: E402
from dcgan_dist.tracking.store import TrackingError  # noqa: E402

MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# The MLflow client's HTTP retry policy, where the driver sets one: the workers talk to the same server.
MLFLOW_HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
# Checkpoints on S3 go through pyarrow (the AWS C++ SDK), whose defaults give up early: a 1 s
# connect timeout, a 3 s request timeout (curl's "less than 1 byte/s for 3 s" on Linux), 3
# attempts. A failed write of Ray Train's checkpoint_manager_snapshot.json is a ControllerError
# that Ray Train never retries (whatever max_failures or controller_failure_limit say), so the
# filesystem itself must ride out stalls, throttling and cut connections: 30 s without a byte
# before an attempt is abandoned, and 10 attempts (the SDK's backoff grows to 20 s: about 2
# minutes of outage survived per request, then the run fails naming the endpoint).
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 10
# What Ray Train 2.60 counts as controller failures it may retry: only a worker group that
# failed or timed out starting (60 s each, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S), e.g. while
# a lost node's replacement joins. Unbounded by default: a cluster that never gets its nodes
# back would wait forever. 10 start-ups (~10 minutes) is room for a replacement pod, not more.
CONTROLLER_FAILURE_LIMIT = 10


def preflight(cfg: Config) -> Config:
    """Resolve paths and URIs to what workers on any node can use, and fail early with the
    option at fault. Raises ConfigError or TrackingError."""
    check_ray_address(cfg.cluster.ray_address)
    if cfg.data.data in data.SOURCES:
        if cfg.data.decode == "gpu":
            raise ConfigError("decode", f"gpu decodes JPEG shards; --data {cfg.data.data} is a bundled set of pixels")
        num_images = len(data.open_dataset(cfg.data.data, cfg.model.image_size))
    elif manifest.is_manifest_url(cfg.data.data):
        num_images = check_manifest(cfg)
    elif is_shard_pattern(cfg.data.data):  # never a scan of the shards here: a million objects would take hours
        raise ConfigError("data", f"{redact(cfg.data.data)} names shards without a manifest; index them once with "
                                  f"`python -m dcgan_dist.shards index '{redact(cfg.data.data)}' --out PATH/manifest.json` "
                                  "and train with --data PATH/manifest.json")
    else:
        raise ConfigError("data", f"unknown data set {cfg.data.data!r}; available: {', '.join(data.SOURCES)}, "
                                  "or a shard manifest (PATH/manifest.json, s3://bucket/prefix/manifest.json)")
    if num_images < cfg.loop.batch_size:  # an epoch is num_images // --batch-size steps at any world size
        raise ConfigError("batch_size", f"{redact(cfg.data.data)} has {num_images} images, too few for one global batch "
                                        f"of {cfg.loop.batch_size}")
    if cfg.loop.max_epochs:  # an epoch is num_images // --batch-size steps on any number of workers
        cfg.loop.max_steps = cfg.loop.max_epochs * (num_images // cfg.loop.batch_size)

    check_evaluation(cfg)
    cfg.tracking.tracking_uri = store.resolve_tracking_uri(cfg.tracking.tracking_uri)
    store.check_reachable(cfg.tracking.tracking_uri)
    store.ensure_experiment(cfg.tracking.tracking_uri, cfg.tracking.experiment)

    if s3.is_s3(cfg.tracking.storage_path):
        try:
            s3.check_writable(cfg.tracking.storage_path)
        except s3.StorageError as e:
            raise ConfigError("storage_path", str(e)) from None
    elif "://" not in cfg.tracking.storage_path:
        storage = Path(cfg.tracking.storage_path).expanduser().resolve()
        try:
            storage.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("storage_path", f"cannot create {storage}: {e.strerror}") from None
        cfg.tracking.storage_path = str(storage)
    return cfg


def check_evaluation(cfg: Config) -> None:
    """Load a user's Inception weights now (a bad file fails here, not at the first evaluation)."""
    if not cfg.eval.eval_every:
        return
    from dcgan_dist.evaluate import backbones

    if cfg.eval.eval_backbone in backbones.NEEDS_WEIGHTS:
        cfg.eval.inception_weights = str(Path(cfg.eval.inception_weights).expanduser().resolve())  # workers run elsewhere
        try:
            backbones.load(cfg.eval.eval_backbone, cfg.eval.inception_weights)
        except backbones.BackboneError as e:
            raise ConfigError("inception_weights", str(e).removeprefix("--inception-weights: ")) from None
    elif cfg.data.data not in data.SOURCES:
        print(f"note: --eval-backbone digits scores {redact(cfg.data.data)} with a digits classifier's features; "
              "for other images use --eval-backbone inception --inception-weights FILE", file=sys.stderr)


def check_ray_address(flag_value: str, timeout_s: float = 3.0) -> None:
    """--ray-address (or RAY_ADDRESS) must answer within seconds; ray.init would otherwise
    retry for about a minute. A HOST:PORT address gets the standard gRPC health check, which
    Ray's GCS serves (so a port that merely accepts connections does not pass); a ray://
    (Ray Client) address must accept a TCP connection. Empty, 'local' and 'auto' (this
    machine's running cluster) are left to ray.init."""
    address = flag_value or os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local", "auto"):
        return
    source = "" if flag_value else " (from RAY_ADDRESS)"
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        raise ConfigError("ray_address", f"{address!r}{source} is not HOST:PORT, ray://HOST:PORT or auto "
                                         "(http:// is the dashboard's address, for ray job submit)")
    if address.startswith("ray://"):
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except OSError as e:
            raise ConfigError("ray_address", f"cannot reach the Ray cluster at {address}{source}: {e.strerror or e}") from None
        return
    import grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        health_check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                           request_serializer=bytes, response_deserializer=bytes)
        try:
            serving = health_check(b"", timeout=timeout_s) == b"\x08\x01"  # HealthCheckResponse{status: SERVING}
            problem = "" if serving else "it is not serving"
        except grpc.RpcError as e:
            problem = f"{e.code().name}: {(e.details() or '').splitlines()[0][:200]}"
    if problem:
        raise ConfigError("ray_address", f"no Ray cluster answers at {address}{source} ({problem})")


def check_manifest(cfg: Config) -> int:
    """Fetch the manifest and HEAD its first shard, failing in seconds (few retries, short
    timeouts) with the URL or the field at fault. Returns the number of images."""
    if not s3.is_s3(cfg.data.data) and "://" not in cfg.data.data:
        cfg.data.data = str(Path(cfg.data.data).expanduser().resolve())  # workers run elsewhere
    try:
        shards = manifest.read(cfg.data.data, fast=True)
        first_shard = shards.shard_urls[0]
        if not s3.exists(first_shard, fast=True):
            raise ConfigError("data", f"manifest {redact(cfg.data.data)}: its first shard {redact(first_shard)} is missing")
    except s3.StorageError as e:
        raise ConfigError("data", str(e)) from None
    except manifest.ManifestError as e:
        raise ConfigError("data", str(e)) from None
    if shards.original_size:  # indexed shards: resized to --image-size as they are read
        if cfg.data.decode == "gpu" and not set(shards.image_keys) <= {"jpg", "jpeg"}:
            raise ConfigError("decode", f"gpu decodes JPEGs; manifest {redact(cfg.data.data)} counts {'/'.join(shards.image_keys)} images "
                                        "(index the shards with --image-key jpg,jpeg)")
        return shards.num_samples
    if shards.image_size != cfg.model.image_size:
        raise ConfigError("image_size", f"{cfg.model.image_size} disagrees with field 'image_size' = {shards.image_size} "
                                        f"of manifest {redact(cfg.data.data)}")
    if cfg.data.decode == "gpu" and shards.image_format != "jpeg":
        raise ConfigError("decode", f"gpu decodes JPEG shards; manifest {redact(cfg.data.data)} holds {shards.image_format}")
    return shards.num_samples


def is_shard_pattern(data: str) -> bool:
    """--data naming tar shards (a brace pattern, a .tar URL or an s3:// prefix) rather than a manifest."""
    return data.endswith((".tar", "/")) or "{" in data or data.startswith("s3://")


def training_data(cfg: Config) -> dict[str, str]:
    """What the run trains on, for MLflow's Datasets panel and the lineage tags: a name, the
    source (the manifest URL, or the bundled set's name) and a sha256 (of the bundled images,
    or of the manifest, which holds each shard's sha256)."""
    if cfg.data.data in data.SOURCES:
        images = data.open_dataset(cfg.data.data, cfg.model.image_size).tensors[0]
        return {"name": cfg.data.data, "source": cfg.data.data, "sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    raw = s3.read_bytes(cfg.data.data, fast=True)
    name = json.loads(raw).get("source", "shards")  # the preflight read this manifest: it is valid JSON
    return {"name": name, "source": redact(cfg.data.data), "sha256": hashlib.sha256(raw).hexdigest()}


def code_version() -> dict[str, str]:
    """The installed package's version and, in a git checkout, the commit and whether it is dirty."""
    try:
        version = importlib.metadata.version("dcgan-dist")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
        version = "source tree"
    tags = {"code.version": version}
    package_dir = Path(__file__).resolve().parent
    try:  # a git checkout (an installed wheel or image has none)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package_dir,
                                     capture_output=True, text=True, timeout=10)
            tags["code.git_commit"] = commit.stdout.strip()
            tags["code.git_dirty"] = str(bool(changes.stdout.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    return tags


def launch_info(cfg: Config, entry_point: str) -> dict:
    """What every worker is handed besides the config: the MLflow run to write into (created
    here, or found again on resume: see tracking/training_run.py), the run's lineage tags (code,
    data, Ray job), the MLflow source tags (the entry point, not Ray's worker script) and the
    training data (Ray must be initialised; the world size is tagged by the workers)."""
    import ray

    dataset = training_data(cfg)
    tags = code_version() | {"data.manifest": dataset["source"], "data.sha256": dataset["sha256"],
                             "ray.job_id": ray.get_runtime_context().get_job_id()}
    # `ray job submit` hands its driver the submission id in the job config's metadata.
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    if job_config.get("metadata", {}).get("job_submission_id"):
        tags["ray.submission_id"] = job_config["metadata"]["job_submission_id"]
    source_tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "JOB" if "ray.submission_id" in tags else "LOCAL"}
    if "code.git_commit" in tags:
        source_tags["mlflow.source.git.commit"] = tags["code.git_commit"]
    launch = {"tags": tags, "source_tags": source_tags, "dataset": dataset}
    launch["mlflow_run_id"], _ = training_run.open_training_run(cfg, launch)
    return launch


def build_trainer(cfg: Config, callbacks: list | None = None, entry_point: str = "dcgan_dist.train", launch: dict | None = None):
    """The TorchTrainer for a preflighted config (Ray must be initialised). Sweeps build one
    per trial, with Tune's report callback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dcgan_dist.loop import train_loop

    return TorchTrainer(
        train_loop,
        # Window reports only for a listener (a sweep's Tune scheduler): Ray Train 2.60 takes a
        # worker's report at its poll, every 2 s, and a synchronous one holds the step until then.
        train_loop_config={"config": config.flatten(cfg), **(launch or launch_info(cfg, entry_point)), "env": worker_env(cfg),
                           "report_windows": bool(callbacks)},
        scaling_config=ray.train.ScalingConfig(
            # (MIN, MAX): Ray Train starts once MIN workers fit, checks every --resize-interval-s
            # whether more fit (and then restarts larger from a checkpoint), restarts smaller after a loss.
            num_workers=cfg.worker_range if cfg.worker_range[0] < cfg.worker_range[1] else cfg.worker_range[0],
            elastic_resize_monitor_interval_s=cfg.cluster.resize_interval_s,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker=placement.worker_request(cfg.cluster, cfg.cluster.cpus_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.tracking.run_name,
            **storage(cfg.tracking.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.loop.keep_checkpoints),
            # After a worker or node failure, Ray Train restarts the workers from the latest checkpoint.
            # A preemption (a node drained with notice) is counted apart from failures.
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures,
                                                   max_preemption_failures=cfg.cluster.max_preemptions,
                                                   controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            callbacks=callbacks,
            # Quiet by default: Ray Train's own INFO lines (a line per report) only with --verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.loop.verbose else "WARNING"),
        ),
    )


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment the workers take from the driver. The AWS_* settings and MLflow's credentials
    travel in memory (never logged), so workers read shards from the endpoint and log to the
    server with the credentials the preflight checked (Ray may have been started without them);
    MLflow's run links stay unprinted there too when the tracking URI carries credentials."""
    names = s3.AWS_ENV_VARS + MLFLOW_CREDENTIALS + MLFLOW_HTTP_SETTINGS + (store.QUIET_RUN_LINKS,)
    env = {name: os.environ[name] for name in names if name in os.environ}
    if not cfg.loop.verbose:
        env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a bar per downloaded artifact at registration
    return env


def storage(storage_path: str) -> dict:
    """RunConfig's storage arguments. An s3:// path gets an explicit pyarrow S3FileSystem so a
    custom endpoint (AWS_ENDPOINT_URL: MinIO, Ceph, moto), the driver's credentials and the
    timeouts and retries above reach every Ray process; it travels to them in memory only,
    pickled (the retries too: checkpoint_s3)."""
    if not s3.is_s3(storage_path):
        return {"storage_path": storage_path}
    from pyarrow import fs

    from dcgan_dist.checkpoint_s3 import RetryingS3FileSystem

    env = os.environ.get
    options = {
        "endpoint_override": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
        "region": env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
        "access_key": env("AWS_ACCESS_KEY_ID"),
        "secret_key": env("AWS_SECRET_ACCESS_KEY"),
        "session_token": env("AWS_SESSION_TOKEN"),
    }
    if not (options["access_key"] and options["secret_key"]):  # else the nodes' own chain (roles, files)
        options.pop("access_key"), options.pop("secret_key"), options.pop("session_token")
    bucket, prefix = s3.split(storage_path)
    filesystem = RetryingS3FileSystem(**{key: value for key, value in options.items() if value},
                                      connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
                                      retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS))
    return {"storage_path": f"{bucket}/{prefix}".rstrip("/"), "storage_filesystem": filesystem}


def fit(cfg: Config):
    """Run the training on Ray (joining --ray-address / RAY_ADDRESS, or starting a local
    instance) and return Ray Train's Result."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.cluster.ray_address or None)
    nodes, _ = placement.cluster_nodes()  # the autoscaler's node groups too, where it publishes them
    cfg.cluster.cpus_per_worker = placement.cpus_per_worker(cfg.cluster, nodes)
    launch = launch_info(cfg, "dcgan_dist.train")
    try:
        return build_trainer(cfg, launch=launch).fit()
    except BaseException:
        training_run.end_failed(cfg.tracking.tracking_uri, launch["mlflow_run_id"])
        raise


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(argv, prog=PROG, description=__doc__.split("\n\n")[0])
    if not cfg.loop.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # e.g. its store's "Creating initial tables" lines
    return run_cli(PROG, lambda: train(cfg), (ConfigError, TrackingError))


def train(cfg: Config) -> int:
    """Preflight (a bad input raises before Ray starts), fit, and the summary lines."""
    from ray.train import TrainingFailedError

    cfg = preflight(cfg)
    try:
        result = fit(cfg)
    except TrainingFailedError as e:  # the workers' tracebacks are in the log above; this is the summary
        where = f"{cfg.tracking.storage_path.rstrip('/')}/{cfg.tracking.run_name}"
        print(f"python -m dcgan_dist.train: training failed ({failure_summary(e)}); its checkpoints in {redact(where)} "
              "are kept: fix the cause and re-run the same command to resume from the latest "
              f"(--max-failures {cfg.cluster.max_failures} restarts were allowed)", file=sys.stderr)
        return 1
    run_id = (result.metrics or {}).get("mlflow_run_id")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and s3.is_s3(cfg.tracking.storage_path):
        checkpoint = f"s3://{checkpoint}"  # the path on the S3 filesystem, bucket first
    print(f"\nTraining finished at step {(result.metrics or {}).get('step')}; checkpoint: {checkpoint}")
    if run_id:
        uri = cfg.tracking.tracking_uri
        print(f"MLflow run: {run_id} (experiment {cfg.tracking.experiment!r}, store {redact(uri)})")
        if uri.startswith("sqlite:"):
            print(f"Open it with:  mlflow ui --backend-store-uri {uri}   then browse http://127.0.0.1:5000")
        else:
            print(f"Open it at:  {redact(uri)}")
    return 0


def failure_summary(error: BaseException) -> str:
    """The cause of a failed fit() in one line: the lowest failed rank's exception (the last line
    of its traceback), or the controller's, without credentials (MLflow's errors name the URL
    they requested, user:password@ included)."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        where = f"rank {rank}"
    else:
        cause, where = getattr(error, "controller_failure", error), "Ray Train's controller"
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return redact(f"{where}: {lines[-1] if lines else type(cause).__name__}")


if __name__ == "__main__":
    sys.exit(main())
