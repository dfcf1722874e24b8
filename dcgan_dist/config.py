"""The one typed config: every option of dcgan-dist is a field here.

The CLI flags are generated from these dataclasses (`--lr` sets `optim.lr`), a YAML or JSON
file can fill them in, and `flatten()` turns the tree into dotted keys (`optim.lr`) that are
the MLflow params and the Ray Tune search keys. Leaf names are unique across the tree, so a
flag is just the leaf name with dashes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcgan_dist import choices, worker_flags

# The choices' names only (torch-free): --help and a bad flag answer before torch loads.
from dcgan_dist.choices import BACKBONES, BN_PLACEMENTS, CHECKPOINT_UPLOADS, COMPILE_MODES, DECODERS, IMAGE_SIZES, NEEDS_WEIGHTS, PRECISIONS, PRESETS, SAMPLINGS
from dcgan_dist.util import OneLineErrorParser

BN_CHOICES = BN_PLACEMENTS


def option(default, help: str, choices: tuple | None = None):
    """A config field with the help text (and allowed values) its CLI flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    preset: str = option("pytorch-examples", "architecture preset (see models.PRESETS for each one's deviations from the paper)", PRESETS)
    image_size: int = option(32, "image side in pixels; sets the number of stride-2 blocks", IMAGE_SIZES)
    bn: str = option("paper", "BatchNorm placement: paper = all layers but G's output and D's input", BN_CHOICES)


@dataclass
class OptimConfig:
    lr: float = option(2e-4, "Adam learning rate for both G and D (paper: 2e-4)")
    beta1: float = option(0.5, "Adam beta1 (paper: 0.5; 0.9 oscillates)")
    beta2: float = option(0.999, "Adam beta2")


@dataclass
class DataConfig:
    data: str = option("digits", "'digits' (bundled), or a shard manifest (of `shards pack` or `shards index`): PATH/manifest.json "
                                 "or s3://bucket/prefix/manifest.json")
    loader_workers: int = option(2, "DataLoader processes per Ray worker that read and decode shards (0 = in the training process)")
    shuffle_buffer: int = option(1000, "samples each reader shuffles together: a shuffle buffer, or with --sampling epochs "
                                       "consecutive blocks of this many (shards are also shuffled)")
    sampling: str = option("epochs", "shard manifests: epochs = every sample once per epoch, split across ranks and loader "
                                     "workers, exact resume; resampled = shards drawn with replacement, an endless stream", SAMPLINGS)
    decode: str = option("cpu", "where JPEGs are decoded: cpu = loader processes; gpu = the training worker's GPU, a batch a call (needs --use-gpu)", DECODERS)
    prefetch_batches: int = option(8, "batches each loader process may have ready ahead of training (DataLoader prefetch_factor)")
    shard_retries: int = option(3, "retries for a shard that fails to open before it is skipped and counted")
    max_corrupt_fraction: float = option(0.01, "stop the run when more than this share of images read were corrupt")
    sample_log: str = option("", "audit: every rank writes each step's sample keys to this directory (one that every node "
                                 "shares), a file per rank and restart; empty = off")


@dataclass
class LoopConfig:
    batch_size: int = option(128, "GLOBAL batch size, the same at every world size: each worker takes batch_size // workers, "
                                  "the first (batch_size mod workers) one more, their gradients weighted by it (paper: 128)")
    max_steps: int = option(600, "train until this many G/D updates in total (a resumed run continues to it)")
    max_epochs: int = option(0, "train this many epochs instead (num_samples // --batch-size steps each); 0 = --max-steps decides")
    seed: int = option(0, "random seed; worker k uses seed + k")
    log_every: int = option(10, "read, reduce and log training stats every N steps")
    sample_every: int = option(100, "log a sample grid from a fixed latent batch every N steps")
    checkpoint_every: int = option(200, "checkpoint the full training state every N steps (and at the end)")
    keep_checkpoints: int = option(2, "how many of the latest checkpoints Ray Train keeps (>= 2: a fallback)")
    checkpoint_upload: str = option("auto", "async: checkpoints upload while training goes on (a step waits only if the previous upload "
                                            "still runs); sync; auto: async unless --storage-path is a local/NFS path", CHECKPOINT_UPLOADS)
    verbose: bool = option(False, "print every Ray Train report and MLflow's INFO lines and download bars; "
                                  "default: the progress bar, evaluations, warnings and the summary")


@dataclass
class PerfConfig:
    precision: str = option("fp32", "fp32, or bf16: forward passes under bf16 autocast (weights, gradients and Adam stay fp32)", PRECISIONS)
    channels_last: bool = option(True, "keep images, activations and conv weights channels-last (NHWC): faster convolutions on CPUs and GPUs")
    compile: str = option("off", "torch.compile G and D: off, default, reduce-overhead (adds CUDA graphs on GPUs), max-autotune",
                          COMPILE_MODES)


@dataclass
class ClusterConfig:
    num_workers: str = option("1", "Ray Train workers (data-parallel replicas): N, a fixed run; or MIN:MAX, an elastic one that "
                                   "starts once MIN fit, grows to MAX as nodes join and goes on with fewer when one is lost")
    resize_interval_s: float = option(60.0, "elastic runs: how often Ray Train checks whether more workers fit (then it restarts the "
                                            "group, larger, from the latest checkpoint)")
    use_gpu: bool = option(False, "one GPU per worker, NCCL; otherwise CPU and gloo")
    cpus_per_worker: int = option(
        0, "CPUs (and so torch threads) per worker; 0 = the cluster's CPUs shared among the workers (per GPU with --use-gpu)"
    )
    ray_address: str = option("", "Ray cluster to join (HOST:PORT of its GCS, ray://HOST:PORT, auto); empty = RAY_ADDRESS or a new local instance")
    bn_sync: bool = option(False, "BatchNorm statistics over the global batch (SyncBatchNorm) instead of each worker's share")
    max_failures: int = option(0, "restarts from the latest checkpoint after a worker or node failure (-1 = no limit)")
    max_preemptions: int = option(-1, "restarts after a node preemption (a drain with notice), counted apart from "
                                      "--max-failures (-1 = no limit)")
    worker_resources: str = option(
        "", "more Ray resources each worker asks for, as JSON, e.g. '{\"trainer_slot\": 1}': workers then go only to nodes "
            "that have them (a labelled node group); empty = CPUs (and GPUs) only"
    )


@dataclass
class TrackingConfig:
    tracking_uri: str = option("", "MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = option("dcgan", "MLflow experiment name")
    run_name: str = option("dcgan", "Ray Train run name; re-running with the same name and storage path resumes")
    storage_path: str = option("./ray_results", "where Ray Train keeps checkpoints (local/NFS path or s3://)")
    register_models: bool = option(True, "register G and D in the MLflow model registry at the end")
    logged_models: str = option("every-eval", "which checkpoints become MLflow LoggedModels (G and D, the evaluation's metrics "
                                "linked): every evaluated one, or only the champion and the last (each: ~14 MB at 32 px, seconds)", choices.LOGGED_MODELS)
    parent_run_id: str = option("", "make the MLflow run a child of this run (set by sweeps)")


@dataclass
class EvalConfig:
    eval_every: int = option(200, "FID/KID (and the classifier score) of G every N steps and at the end; the best score's G/D is the `champion`; 0 = off")
    eval_samples: int = option(1000, "generated and real images per evaluation (scores compare only at equal counts)")
    eval_backbone: str = option("digits", "backbone: digits (our classifier), inception, fid-inception (FID's; both need --inception-weights)", BACKBONES)
    inception_weights: str = option("", "inception_v3_google-*.pth, or pt_inception-2015-12-05-*.pth for fid-inception; never downloaded")
    collapse_d_loss: float = option(1e-3, "collapse event when the median of D's loss over the last --collapse-steps steps is below this")
    collapse_steps: int = option(50, "steps over which D's loss median is judged for a collapse")
    rollback_on_collapse: bool = option(False, "on a collapse event, reload the best G/D (by eval score) and continue")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def worker_range(self) -> tuple[int, int]:
        """--num-workers as (MIN, MAX); MIN == MAX for a fixed run."""
        return worker_flags.worker_range(self.cluster.num_workers)


class ConfigError(ValueError):
    """A bad option value; `option` is the flag name it came from."""

    def __init__(self, option: str, message: str):
        super().__init__(f"--{option.replace('_', '-')}: {message}")
        self.option = option


# ---------------------------------------------------------------- the field tree


def _leaves(cls=Config, prefix: str = ""):
    """(dotted path, dataclass field, python type) for every leaf option, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], path + ".")
        else:
            yield path, f, hints[f.name]


LEAVES = {path: (f, tp) for path, f, tp in _leaves()}
_BY_NAME = {path.rsplit(".", 1)[1]: path for path in LEAVES}
assert len(_BY_NAME) == len(LEAVES), "config leaf names must be unique: they are the flag names"


def resolve_key(key: str) -> str:
    """A full dotted path, or the leaf name alone (`lr` -> `optim.lr`), to the full path."""
    if key in LEAVES:
        return key
    if key.replace("-", "_") in _BY_NAME:
        return _BY_NAME[key.replace("-", "_")]
    raise KeyError(key)


def coerce(path: str, value: Any) -> Any:
    """Convert a value from a file, a flag or a flattened dict to the field's type."""
    _, tp = LEAVES[path]
    name = path.rsplit(".", 1)[1]
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {tp.__name__}, got {value!r}") from None


def get(cfg: Config, path: str) -> Any:
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_value(cfg: Config, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, coerce(path, value))


def flatten(cfg: Config) -> dict[str, Any]:
    """{'model.preset': 'paper', 'optim.lr': 0.0002, ...}: MLflow params and Tune search keys."""
    return {path: get(cfg, path) for path in LEAVES}


def from_flat(values: dict[str, Any], base: Config | None = None) -> Config:
    """Inverse of flatten(); keys may be full paths or unique leaf names."""
    cfg = copy.deepcopy(base) if base else Config()
    for key, value in values.items():
        try:
            path = resolve_key(key)
        except KeyError:
            raise ConfigError(key, "unknown option") from None
        set_value(cfg, path, value)
    return cfg


def load_file(path: str | Path, base: Config | None = None) -> Config:
    """A YAML/JSON file of sections ({model: {preset: paper}}) or dotted/leaf keys ({lr: 1e-4})."""
    return from_flat(read_file(path), base)


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file's options as {dotted or leaf key: value}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML/JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of options")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                flat[f"{key}.{sub_key}"] = sub_value
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first bad option. Nothing is clamped or fixed up."""
    for path, (f, _) in LEAVES.items():
        choices = f.metadata["choices"]
        if choices and get(cfg, path) not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise ConfigError(f.name, f"must be one of {allowed} (got {get(cfg, path)!r})")

    def positive(name: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(name, f"must be > 0 (got {value})")

    positive("lr", cfg.optim.lr)
    for name in ("beta1", "beta2"):
        value = getattr(cfg.optim, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(name, f"must be in [0, 1) (got {value})")
    for name in ("batch_size", "max_steps", "log_every", "sample_every", "checkpoint_every"):
        positive(name, getattr(cfg.loop, name))
    if cfg.loop.keep_checkpoints < 2:  # the one before the latest is the fallback when the latest is unreadable
        raise ConfigError("keep_checkpoints", f"must be >= 2 (got {cfg.loop.keep_checkpoints})")
    for name, parse in (("num_workers", worker_flags.worker_range), ("worker_resources", worker_flags.worker_resources)):
        try:
            parse(getattr(cfg.cluster, name))
        except ValueError as e:
            raise ConfigError(name, str(e)) from None
    if (max_workers := cfg.worker_range[1]) > cfg.loop.batch_size:
        raise ConfigError("num_workers", f"{max_workers} workers cannot share a global --batch-size of {cfg.loop.batch_size} "
                                         "(each needs at least one image)")
    positive("prefetch_batches", cfg.data.prefetch_batches)
    for section, name in (("data", "loader_workers"), ("data", "shuffle_buffer"), ("data", "shard_retries"), ("loop", "max_epochs"),
                          ("cluster", "resize_interval_s")):
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(name, f"must be >= 0 (got {getattr(getattr(cfg, section), name)})")
    if not 0.0 <= cfg.data.max_corrupt_fraction <= 1.0:
        raise ConfigError("max_corrupt_fraction", f"must be in [0, 1] (got {cfg.data.max_corrupt_fraction})")
    if cfg.data.decode == "gpu" and not cfg.cluster.use_gpu:
        raise ConfigError("decode", "gpu decodes on the training workers' CUDA devices: it needs --use-gpu")
    for name in ("max_failures", "max_preemptions"):
        if getattr(cfg.cluster, name) < -1:
            raise ConfigError(name, f"must be >= -1 (got {getattr(cfg.cluster, name)})")
    if cfg.cluster.cpus_per_worker < 0:
        raise ConfigError("cpus_per_worker", f"must be >= 0 (got {cfg.cluster.cpus_per_worker})")
    from dcgan_dist import models  # torch: the parser and --help do without it

    if cfg.model.image_size not in (sizes := models.PRESETS[cfg.model.preset].image_sizes):
        raise ConfigError("image_size", f"preset {cfg.model.preset} takes {'/'.join(map(str, sizes))} px only (got {cfg.model.image_size})")
    validate_eval(cfg)
    if not cfg.tracking.experiment.strip():
        raise ConfigError("experiment", "must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.tracking.run_name):
        raise ConfigError("run_name", f"use letters, digits, '_', '.', '-' (got {cfg.tracking.run_name!r})")
    return cfg


def validate_eval(cfg: Config) -> None:
    if cfg.eval.eval_every < 0:
        raise ConfigError("eval_every", f"must be >= 0 (got {cfg.eval.eval_every})")
    if cfg.eval.eval_samples < 10:
        raise ConfigError("eval_samples", f"must be >= 10 (got {cfg.eval.eval_samples})")
    if cfg.eval.collapse_d_loss < 0:
        raise ConfigError("collapse_d_loss", f"must be >= 0 (got {cfg.eval.collapse_d_loss})")
    if cfg.eval.collapse_steps < 1:
        raise ConfigError("collapse_steps", f"must be >= 1 (got {cfg.eval.collapse_steps})")
    if cfg.eval.eval_every and cfg.eval.eval_backbone in NEEDS_WEIGHTS and not cfg.eval.inception_weights:
        raise ConfigError("inception_weights", f"--eval-backbone {cfg.eval.eval_backbone} needs a weights file (nothing is downloaded)")


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field. Defaults are SUPPRESSed so only flags actually given override."""
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file; flags override it")
    for path, (f, tp) in LEAVES.items():
        group_title = path.split(".")[0]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = tp.__name__.upper() if not f.metadata["choices"] else None
        _group(parser, group_title).add_argument(flag, **kwargs)


def _group(parser: argparse.ArgumentParser, title: str):
    return next((g for g in parser._action_groups if g.title == title), None) or parser.add_argument_group(title)


def from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """base (or Config()) <- --config file <- flags, then validated."""
    base = base or Config()
    from_file = read_file(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in LEAVES}
    cfg = from_flat(given, from_flat(from_file, base))
    if cfg.loop.max_epochs and "loop.max_steps" in {resolve_key(k) for k in from_file} | set(given):
        raise ConfigError("max_epochs", f"{cfg.loop.max_epochs} and --max-steps both given: exactly one of them decides the end")
    return validate(cfg)


def build_parser(prog: str = "dcgan_dist.train", description: str = "") -> OneLineErrorParser:
    """The training CLI's parser: --config and one flag per config field."""
    parser = OneLineErrorParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


def parse(argv: list[str] | None = None, prog: str = "dcgan_dist.train", description: str = "") -> Config:
    """Parse argv into a validated Config; a bad value exits 2 with one line naming the option."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    try:
        return from_args(args)
    except ConfigError as e:
        parser.error(str(e))
