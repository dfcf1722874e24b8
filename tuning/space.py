"""The search space of a sweep: its dimensions (config field paths and their values), the
parsed `Sweep`, and how one trial's config is made from the base config. No Ray here: the CLI
validates a sweep with this module alone, before Ray or Tune load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from dcgan_dist import config
from dcgan_dist.config import Config, ConfigError

# The paper's ablations (section 3 and 4): Adam's beta1 and learning rate, and where BatchNorm
# goes. Values are checked against the config's own choices (check_values) whenever used.
ABLATIONS = {
    "paper": {"optim.beta1": [0.5, 0.9], "optim.lr": [2e-4, 1e-3], "model.bn": ["paper", "all", "none"]},
}
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SCHEDULERS = ("asha", "none")  # ASHA's early stopping on the sweep's metric, or every trial to its end
MODES = ("min", "max")
# With evaluation on (--eval-every > 0, the default), trials are compared on FID (lower is
# better). With it off, on the generator's non-saturating loss: lower means G fools D more, a
# weak signal of sample quality.
EVAL_METRIC, LOSS_METRIC, DEFAULT_MODE = "eval/fid", "loss_g", "min"


def default_metric(base: Config) -> str:
    return EVAL_METRIC if base.eval.eval_every else LOSS_METRIC


@dataclass
class Dimension:
    """One search key: a grid of values, a choice among values, or a distribution."""

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
    trial_start_timeout_s: float = 600.0  # a trial whose workers cannot all be placed in this time fails


class SweepError(ConfigError):
    pass


def parse_dimension(spec: str) -> Dimension:
    """KEY=v1,v2,... (grid) or KEY=DIST:low:high (uniform, loguniform, randint) or KEY=choice:a,b."""
    if "=" not in spec:
        raise SweepError("search", f"expected KEY=VALUES, got {spec!r}")
    key, _, values = spec.partition("=")
    key, values = key.strip(), values.strip()
    try:
        path = config.resolve_key(key)
    except KeyError:
        raise SweepError("search", f"unknown search key {key!r} (keys are config paths such as optim.lr, or unique leaf names)") from None
    if not values:
        raise SweepError("search", f"no values for {key!r}")
    kind, _, rest = values.partition(":")
    if kind in DISTRIBUTIONS and rest:
        if kind == "choice":
            return Dimension(path, distribution="choice", grid=values_of(key, path, rest))
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise SweepError("search", f"{key}: expected {kind}:LOW:HIGH, got {values!r}")
        low, high = (config.coerce(path, bound) for bound in bounds)
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise SweepError("search", f"{key}: {kind} needs a numeric option, {path} is not")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise SweepError("search", f"{key}: {kind} needs 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise (got {low}, {high})")
        return Dimension(path, distribution=kind, low=low, high=high)
    return Dimension(path, grid=values_of(key, path, values))


def values_of(key: str, path: str, listed: str) -> list[Any]:
    """The comma-separated values of a grid or a choice, as the field's type. None is an error:
    an empty grid or choice would expand to no trial at all (Tune fails on both)."""
    values = [config.coerce(path, value.strip()) for value in listed.split(",") if value.strip()]
    if not values:
        raise SweepError("search", f"no values for {key!r}")
    return values


def check_values(base: Config, dimension: Dimension) -> None:
    """Every value a trial can get must pass the same validation a training run does."""
    values = dimension.grid if dimension.grid else [dimension.low, dimension.high]
    for value in values:
        trial = copy.deepcopy(base)
        config.set_value(trial, dimension.path, value)
        config.validate(trial)


def dimensions(specs: list[str], ablation: str | None, base: Config) -> list[Dimension]:
    """The --search specs, plus the named ablation's keys that no --search gave, each value
    checked against the base config."""
    found = [parse_dimension(spec) for spec in specs]
    if ablation:
        given = {d.path for d in found}
        found += [Dimension(path, grid=list(values)) for path, values in ABLATIONS[ablation].items() if path not in given]
    if not found:
        raise SweepError("search", "the search space is empty: give --search KEY=VALUES or --ablation paper")
    if len({d.path for d in found}) != len(found):
        raise SweepError("search", "a key is searched twice")
    for dimension in found:
        check_values(base, dimension)
    return found


def trial_config(base: dict[str, Any], params: dict[str, Any], *, run_name: str, parent_run_id: str,
                 storage_path: str) -> Config:
    """One trial's config: the flattened base config with this trial's searched values, its own
    run name (the resume key of its Train run and MLflow child run), under the sweep's parent run."""
    cfg = config.from_flat(params, config.from_flat(base))
    cfg.tracking.run_name = run_name
    cfg.tracking.parent_run_id = parent_run_id
    cfg.tracking.storage_path = storage_path
    return cfg


def format_value(value: Any) -> str:
    """A searched value as a trial's name shows it: 1e-3 and 2e-4 rather than 0.001 and 0.0002."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, _, exponent = f"{value:.3e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_label(dimensions: list[Dimension], params: dict[str, Any], trial_id: str = "", repeated: bool = False) -> str:
    """A trial's name in MLflow: what it varies, e.g. `beta1=0.5 lr=1e-3 bn=paper` (leaf names
    are unique across the config). A repeated grid (--num-samples > 1) adds the trial's number."""
    label = " ".join(f"{d.path.rpartition('.')[2]}={format_value(params.get(d.path))}" for d in dimensions)
    if repeated and trial_id:
        label += f" #{trial_id.rpartition('_')[2].lstrip('0') or '0'}"
    return label
