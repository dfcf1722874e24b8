"""`python -m tuning.sweep`: the paper's ablations (or any search) as a Ray Tune sweep.

Each trial is a full `dcgan_dist.train` run (a TorchTrainer, possibly multi-worker) whose
MLflow run is a child of the sweep's parent run. Search keys are the config's own dotted field
paths (`optim.lr`), or their last part where unique (`lr`). Every training flag applies to every
trial. Re-running with the same --sweep-name and --storage-path resumes an interrupted sweep
without re-running finished trials.

    python -m tuning.sweep --search lr=1e-4,2e-4 --search beta1=0.5,0.9 --max-steps 300
    python -m tuning.sweep --search lr=loguniform:1e-5:1e-3 --num-samples 8
    python -m tuning.sweep --ablation paper --max-steps 2000
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from typing import Any

from dcgan_dist import config, train
from dcgan_dist.config import Config, ConfigError
from dcgan_dist.tracking.store import TrackingError

# The paper's ablations (section 3 and 4): Adam's beta1 and learning rate, and where BatchNorm goes.
ABLATIONS = {
    "paper": {"optim.beta1": [0.5, 0.9], "optim.lr": [2e-4, 1e-3], "model.bn": ["paper", "all", "none"]},
}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
# With evaluation on (--eval-every > 0, the default), trials are compared on FID (lower is
# better). With it off, on the generator's non-saturating loss: lower means G fools D more, a
# weak signal of sample quality.
EVAL_METRIC, LOSS_METRIC, DEFAULT_MODE = "eval/fid", "loss_g", "min"


def default_metric(base: Config) -> str:
    return EVAL_METRIC if base.eval.eval_every else LOSS_METRIC


@dataclass
class Dimension:
    """One search key: a grid of values or a distribution."""

    path: str
    grid: list[Any] = field(default_factory=list)
    distribution: str = ""
    low: float = 0.0
    high: float = 0.0

    def describe(self) -> str:
        if self.distribution == "choice":
            return "choice(" + ", ".join(str(v) for v in self.grid) + ")"
        if self.grid:
            return "grid(" + ", ".join(str(v) for v in self.grid) + ")"
        return f"{self.distribution}({self.low}, {self.high})"


@dataclass
class Sweep:
    base: Config
    dimensions: list[Dimension]
    sweep_name: str
    num_samples: int
    max_concurrent: int  # 0 = as many as the cluster's resources allow
    scheduler: str
    metric: str
    mode: str
    grace_steps: int


class SweepError(ConfigError):
    pass


def parse_dimension(spec: str) -> Dimension:
    """KEY=v1,v2,... (grid) or KEY=DIST:low:high (uniform, loguniform, randint) or KEY=choice:a,b."""
    if "=" not in spec:
        raise SweepError("search", f"expected KEY=VALUES, got {spec!r}")
    key, _, values = spec.partition("=")
    try:
        path = config.resolve_key(key.strip())
    except KeyError:
        raise SweepError("search", f"unknown search key {key.strip()!r} (keys are config paths such as optim.lr, or unique leaf names)") from None
    values = values.strip()
    if not values:
        raise SweepError("search", f"no values for {key.strip()!r}")
    kind, _, rest = values.partition(":")
    if kind in DISTRIBUTIONS and rest:
        if kind == "choice":
            return Dimension(path, distribution="choice", grid=[config.coerce(path, v) for v in rest.split(",") if v])
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise SweepError("search", f"{key}: expected {kind}:LOW:HIGH, got {values!r}")
        low, high = (config.coerce(path, bound) for bound in bounds)
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise SweepError("search", f"{key}: {kind} needs a numeric option, {path} is not")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise SweepError("search", f"{key}: {kind} needs 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise (got {low}, {high})")
        return Dimension(path, distribution=kind, low=low, high=high)
    grid = [config.coerce(path, v.strip()) for v in values.split(",") if v.strip()]
    if not grid:
        raise SweepError("search", f"no values for {key.strip()!r}")
    return Dimension(path, grid=grid)


def check_values(base: Config, dimension: Dimension) -> None:
    """Every value a trial can get must pass the same validation a training run does."""
    values = dimension.grid if dimension.grid else [dimension.low, dimension.high]
    for value in values:
        trial = copy.deepcopy(base)
        config.set_value(trial, dimension.path, value)
        config.validate(trial)


def build_parser() -> argparse.ArgumentParser:
    parser = config.OneLineErrorParser(prog="python -m tuning.sweep", description=__doc__.split("\n\n")[0])
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--search", action="append", default=[], metavar="KEY=VALUES",
                       help="a search key and its values: v1,v2 (grid), uniform:LO:HI, loguniform:LO:HI, randint:LO:HI, choice:a,b; repeatable")
    sweep.add_argument("--ablation", choices=sorted(ABLATIONS), help="a named search space: 'paper' = beta1 x lr x bn")
    sweep.add_argument("--sweep-name", default="sweep", help="the Tune experiment (and MLflow parent run) name; the same name resumes")
    sweep.add_argument("--num-samples", type=int, default=1, help="samples of the space (grids are repeated this many times)")
    sweep.add_argument("--max-concurrent", type=int, default=0, help="trials at once; 0 = as many as resources allow")
    sweep.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping (ASHA on --metric) or none")
    sweep.add_argument("--metric", help=f"metric trials are compared on (default {EVAL_METRIC} with evaluation on, else {LOSS_METRIC}; --mode {DEFAULT_MODE})")
    sweep.add_argument("--mode", choices=("min", "max"), help="whether --metric is better low or high (required with --metric)")
    sweep.add_argument("--grace-steps", type=int, default=0, help="ASHA: steps before a trial may be stopped; 0 = max_steps / 8")
    sweep.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (same as --num-workers)")
    sweep.add_argument("--gpus-per-trial", type=int, help="GPUs per trial, one per worker (implies --use-gpu)")
    config.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> Sweep:
    """The sweep settings from argv; bad input exits 2 naming the option, before any trial."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return settings_from_args(args)
    except ConfigError as e:
        parser.error(str(e))


def settings_from_args(args: argparse.Namespace) -> Sweep:
    base = Config()
    base.tracking.register_models = False  # one registry version per trial is noise; opt in with the flag
    base = config.from_args(args, base)
    if args.workers_per_trial is not None:
        base.cluster.num_workers = args.workers_per_trial
    if args.gpus_per_trial:
        if args.workers_per_trial is not None and args.workers_per_trial != args.gpus_per_trial:
            raise SweepError("gpus_per_trial", f"one GPU per worker: {args.gpus_per_trial} GPUs need --workers-per-trial {args.gpus_per_trial}")
        base.cluster.num_workers, base.cluster.use_gpu = args.gpus_per_trial, True
    config.validate(base)

    dimensions = [parse_dimension(spec) for spec in args.search]
    if args.ablation:
        given = {d.path for d in dimensions}
        dimensions += [Dimension(path, grid=list(values)) for path, values in ABLATIONS[args.ablation].items() if path not in given]
    if not dimensions:
        raise SweepError("search", "the search space is empty: give --search KEY=VALUES or --ablation paper")
    if len({d.path for d in dimensions}) != len(dimensions):
        raise SweepError("search", "a key is searched twice")
    for dimension in dimensions:
        check_values(base, dimension)

    if args.metric and not args.mode:
        raise SweepError("mode", f"say whether {args.metric} is better low or high: --mode min|max")
    if args.num_samples < 1:
        raise SweepError("num_samples", f"must be >= 1 (got {args.num_samples})")
    if args.max_concurrent < 0:
        raise SweepError("max_concurrent", f"must be >= 0 (got {args.max_concurrent})")
    if base.loop.checkpoint_every % base.loop.log_every:
        raise SweepError("checkpoint_every", f"must be a multiple of --log-every {base.loop.log_every} in a sweep, so every report carries the metric")
    metric = args.metric or default_metric(base)
    grace = args.grace_steps or max(base.loop.log_every, base.loop.max_steps // 8)
    if metric == EVAL_METRIC:
        # ASHA must not judge a trial before its first score: the first rung comes after it.
        first_score = min(base.eval.eval_every, base.loop.max_steps)
        if args.grace_steps and args.grace_steps < first_score:
            raise SweepError("grace_steps", f"{args.grace_steps} comes before the first {EVAL_METRIC} at step {first_score} (--eval-every)")
        grace = max(grace, first_score)
    return Sweep(base, dimensions, args.sweep_name, args.num_samples, args.max_concurrent, args.scheduler,
                 metric, args.mode or DEFAULT_MODE, grace)


def main(argv: list[str] | None = None) -> int:
    sweep = parse_args(argv)
    try:
        sweep.base = train.preflight(sweep.base)
    except (ConfigError, TrackingError) as e:
        print(f"python -m tuning.sweep: error: {e}", file=sys.stderr)
        return 2
    from tuning.run import run_sweep  # Ray and Tune load only once the input is known good

    return run_sweep(sweep)


if __name__ == "__main__":
    sys.exit(main())
