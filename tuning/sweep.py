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
import sys

# Nothing here loads torch, Ray or MLflow before the arguments are parsed: --help and a bad flag answer at once.
from dcgan_dist import config
from dcgan_dist.config import ConfigError
from dcgan_dist.util import OneLineErrorParser, run_cli
from tuning import space
from tuning.space import DEFAULT_MODE, EVAL_METRIC, LOSS_METRIC, Sweep, SweepError

PROG = "python -m tuning.sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--search", action="append", default=[], metavar="KEY=VALUES",
                       help="a search key and its values: v1,v2 (grid), uniform:LO:HI, loguniform:LO:HI, randint:LO:HI, choice:a,b; repeatable")
    sweep.add_argument("--ablation", choices=sorted(space.ABLATIONS), help="a named search space: 'paper' = beta1 x lr x bn")
    sweep.add_argument("--sweep-name", default="sweep", help="the Tune experiment (and MLflow parent run) name; the same name resumes")
    sweep.add_argument("--num-samples", type=int, default=1, help="samples of the space (grids are repeated this many times)")
    sweep.add_argument("--max-concurrent", type=int, default=0, help="trials at once; 0 = as many as resources allow")
    sweep.add_argument("--scheduler", choices=space.SCHEDULERS, default="asha", help="early stopping (ASHA on --metric) or none")
    sweep.add_argument("--metric", help=f"metric trials are compared on (default {EVAL_METRIC} with evaluation on, else {LOSS_METRIC}; --mode {DEFAULT_MODE})")
    sweep.add_argument("--mode", choices=space.MODES, help="whether --metric is better low or high (required with --metric)")
    sweep.add_argument("--grace-steps", type=int, default=0, help="ASHA: steps before a trial may be stopped; 0 = max_steps / 8")
    sweep.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (same as --num-workers)")
    sweep.add_argument("--gpus-per-trial", type=int, help="GPUs per trial, one per worker (implies --use-gpu)")
    sweep.add_argument("--trial-start-timeout-s", type=float, default=600.0,
                       help="a trial whose workers cannot all be placed within this many seconds fails (and is counted)")
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
    base = config.Config()
    base.tracking.register_models = False  # one registry version per trial is noise; opt in with the flag
    # Each evaluation's G and D as LoggedModels cost ~14 MB and seconds of a trial's time, over
    # every trial (docs/tracking.md); trials are compared on their metrics. Opt in with the flag.
    base.tracking.logged_models = "champion-and-last"
    base = config.from_args(args, base)
    if args.workers_per_trial is not None:
        base.cluster.num_workers = str(args.workers_per_trial)
    if args.gpus_per_trial:
        if args.workers_per_trial is not None and args.workers_per_trial != args.gpus_per_trial:
            raise SweepError("gpus_per_trial", f"one GPU per worker: {args.gpus_per_trial} GPUs need --workers-per-trial {args.gpus_per_trial}")
        base.cluster.num_workers, base.cluster.use_gpu = str(args.gpus_per_trial), True
    config.validate(base)
    if base.worker_range[0] != base.worker_range[1]:  # the trials at once are planned from each trial's fixed size
        raise SweepError("num_workers", f"a sweep's trials have a fixed size: N, not {base.cluster.num_workers}")
    dimensions = space.dimensions(args.search, args.ablation, base)

    if args.metric and not args.mode:
        raise SweepError("mode", f"say whether {args.metric} is better low or high: --mode min|max")
    # Fewer than one sample would be a sweep of no trials: refused here, never a sweep that ends with nothing.
    if args.num_samples < 1:
        raise SweepError("num_samples", f"must be >= 1 (got {args.num_samples})")
    if args.max_concurrent < 0:
        raise SweepError("max_concurrent", f"must be >= 0 (got {args.max_concurrent})")
    if not args.trial_start_timeout_s > 0:
        raise SweepError("trial_start_timeout_s", f"must be > 0 (got {args.trial_start_timeout_s})")
    if args.grace_steps < 0:
        raise SweepError("grace_steps", f"must be >= 0 (got {args.grace_steps})")
    if base.loop.checkpoint_every % base.loop.log_every:
        raise SweepError("checkpoint_every", f"must be a multiple of --log-every {base.loop.log_every} in a sweep, so every report carries the metric")
    metric = args.metric or space.default_metric(base)
    grace = args.grace_steps or max(base.loop.log_every, base.loop.max_steps // 8)
    if metric == EVAL_METRIC:
        # ASHA must not judge a trial before its first score: the first rung comes after it.
        first_score = min(base.eval.eval_every, base.loop.max_steps)
        if args.grace_steps and args.grace_steps < first_score:
            raise SweepError("grace_steps", f"{args.grace_steps} comes before the first {EVAL_METRIC} at step {first_score} (--eval-every)")
        grace = max(grace, first_score)
    return Sweep(base, dimensions, args.sweep_name, args.num_samples, args.max_concurrent, args.scheduler,
                 metric, args.mode or DEFAULT_MODE, grace, args.trial_start_timeout_s)


def preflight(sweep: Sweep) -> int:
    """The checks a training run makes before Ray starts (the store, the data, the evaluation),
    and which Ray the sweep joins."""
    from dcgan_dist import train

    sweep.base.cluster.ray_address = ray_target(sweep.base.cluster.ray_address)
    sweep.base = train.preflight(sweep.base)
    return 0


def ray_target(flag_value: str) -> str:
    """The Ray the sweep runs on: --ray-address, else RAY_ADDRESS (the two must agree where
    both are given), else the one instance running on this machine, else "local" (a new one).
    Several instances here and no address is ambiguous: Ray would pick the latest `ray start`,
    or start yet another, whose trials' resources the others' cleaners cannot free. Raises
    ConfigError naming the choice to make."""
    import os

    env_value = os.environ.get("RAY_ADDRESS", "")
    if flag_value and env_value and flag_value != env_value:
        raise SweepError("ray_address", f"{flag_value} disagrees with RAY_ADDRESS={env_value}: give one of them")
    if flag_value or env_value:
        return flag_value or env_value
    import ray
    from ray._private import services

    if ray.is_initialized():  # this process runs Ray already (a test, a notebook): that one
        return ""
    running = sorted(services.find_gcs_addresses())
    if len(running) > 1:
        raise SweepError("ray_address", f"{len(running)} Ray instances run on this machine ({', '.join(running)}): "
                                        "say which with --ray-address, or stop the others")
    return running[0] if running else "local"


def main(argv: list[str] | None = None) -> int:
    sweep = parse_args(argv)
    from dcgan_dist.tracking.store import TrackingError

    if code := run_cli(PROG, lambda: preflight(sweep), (ConfigError, TrackingError)):
        return code
    from tuning.run import run_sweep  # Ray and Tune load only once the input is known good

    return run_sweep(sweep)


if __name__ == "__main__":
    sys.exit(main())
