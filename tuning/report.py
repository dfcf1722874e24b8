"""The ablation table (markdown and CSV) and plot (PNG) for a finished sweep."""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from tuning.space import Sweep  # noqa: E402

STATUSES = ("completed", "stopped early", "error", "interrupted", "not run")


def tune_trials(results) -> list | None:
    """Tune's own record of each trial (status, id, config), in the order of `results`, where
    `results` is a ResultGrid: a Result does not say whether its trial ran, was cut off by an
    interrupt, or never started."""
    analysis = getattr(results, "_experiment_analysis", None)
    return list(analysis.trials) if analysis is not None else None


def short_of_the_end(metrics: dict | None, max_steps: int) -> bool:
    """Whether a trial's last report came before its last step: a trial that ended there was stopped."""
    return int((metrics or {}).get("step", 0)) < max_steps


def trial_status(result, trial, max_steps: int, cut_off: bool) -> str:
    state = getattr(trial, "status", "")
    if result.error is not None:
        return "error"
    if state == "PENDING" or (cut_off and not result.metrics):
        return "not run"
    if cut_off or state in ("RUNNING", "PAUSED"):  # stopped by an interrupt, not by the scheduler
        return "interrupted"
    return "stopped early" if short_of_the_end(result.metrics, max_steps) else "completed"


def missing_trials(rows: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Rows for the grid's trials that Tune never made (it makes them as earlier ones end):
    the grid's combinations, --num-samples times each, less those in `rows`."""
    grid = [d for d in sweep.dimensions if d.grid and d.distribution != "choice"]
    wanted = Counter(itertools.product(*(d.grid for d in grid))) if grid else Counter({(): 1})
    for combination in wanted:
        wanted[combination] *= sweep.num_samples
    wanted.subtract(tuple(row[d.path] for d in grid) for row in rows)
    template = {column: None for column in rows[0]} if rows else {}
    return [template | {"trial": "", "steps": 0, "status": "not run", "why": "", "mlflow_run_id": ""}
            | {d.path: None for d in sweep.dimensions} | dict(zip((d.path for d in grid), combination))
            for combination, count in wanted.items() for _ in range(max(count, 0))]


def trial_rows(results, sweep: Sweep, trials: list | None = None, cut_off: Collection[str] = ()) -> list[dict[str, Any]]:
    """One row per trial: its searched values, the metric (last and best), steps, status. A
    trial that errored before reporting anything is a row too, its metric and steps empty, and
    so is one that never ran (`trials`, Tune's record of them, says which: tune_trials). A trial
    in `cut_off` was stopped by an interrupt of the sweep."""
    better = min if sweep.mode == "min" else max
    rows = []
    for result, trial in zip(results, trials or [None] * len(results)):
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        values = frame[sweep.metric].dropna().tolist() if frame is not None and sweep.metric in frame else []
        params = trial_params(result) or dict(getattr(trial, "config", None) or {})
        trial_id = metrics.get("trial_id") or getattr(trial, "trial_id", "?")
        rows.append(
            {"trial": trial_id}
            | {d.path: params.get(d.path) for d in sweep.dimensions}
            | {
                f"last {sweep.metric}": values[-1] if values else None,
                f"best {sweep.metric}": better(values) if values else None,
                "steps": int(metrics.get("step", 0)),
                "status": (status := trial_status(result, trial, sweep.base.loop.max_steps, trial_id in cut_off)),
                "why": cause(result.error) if status == "error" else "",
                "mlflow_run_id": metrics.get("mlflow_run_id", ""),
            }
        )
    return sorted(rows, key=lambda r: (r[f"best {sweep.metric}"] is None, (1 if sweep.mode == "min" else -1) * (r[f"best {sweep.metric}"] or 0)))


def cause(error: BaseException | None) -> str:
    """An error's cause in one short line: the first sentence of its message's last line (Ray
    wraps a trial's exception in the trial actor's traceback)."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if error is not None else ""
    first_sentence = lines[-1].split(". ")[0].rstrip(".")
    return first_sentence[:160].replace("|", "/")


PARAMS_FILE = "params.json"  # Tune's JSON logger writes each trial's config there when it starts


def trial_params(result) -> dict[str, Any]:
    """The trial's searched values. Tune keeps them in the last result, which a trial that
    failed before its first report does not have: then the file Tune wrote at its start."""
    if result.config:
        return result.config
    try:
        with result.filesystem.open_input_stream(f"{result.path}/{PARAMS_FILE}") as stream:
            params = json.loads(stream.read())
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def trial_curves(results, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    curves = {}
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "step" not in frame:
            continue
        frame = frame[["step", metric]].dropna()
        curves[(result.metrics or {}).get("trial_id", "?")] = (frame["step"].tolist(), frame[metric].tolist())
    return curves


def markdown(rows: list[dict[str, Any]], run_url: Callable[[str], str] | None = None) -> str:
    """The table, each MLflow run id a link to its run in the MLflow UI where `run_url` says where."""
    columns = list(rows[0])

    def cell(column: str, value: Any) -> str:
        if column == "mlflow_run_id" and value and run_url:
            return f"[{value}]({run_url(value)})"
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], curves: dict, sweep: Sweep, path: Path) -> None:
    figure = draw(rows, curves, sweep)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw(rows: list[dict[str, Any]], curves: dict, sweep: Sweep):
    """Left: the best metric per value of each searched key. Right: every trial's curve."""
    keys = [d.path for d in sweep.dimensions]
    figure, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.6), squeeze=False)
    best = f"best {sweep.metric}"
    for axis, key in zip(axes[0], keys):
        points = [(row[key], row[best]) for row in rows if row[best] is not None]
        labels = sorted({value for value, _ in points}, key=lambda v: (isinstance(v, str), v))
        axis.scatter([labels.index(label) for label, _ in points], [value for _, value in points])
        axis.set_xticks(range(len(labels)), [str(label) for label in labels])
        axis.set_xlabel(key)
        axis.set_ylabel(best)
    curve_axis = axes[0][-1]
    for trial, (steps, values) in curves.items():
        # markers: a trial with one evaluation is one point, which a line alone does not draw
        curve_axis.plot(steps, values, marker="o", markersize=3, label=trial)
    curve_axis.set_xlabel("step")
    curve_axis.set_ylabel(sweep.metric)
    if curves:  # no trial reported the metric (every one errored): no legend to draw
        curve_axis.legend(fontsize=6)
    figure.suptitle(f"{sweep.sweep_name}: {sweep.metric} ({sweep.mode})")
    figure.tight_layout()
    return figure


def write(rows: list[dict[str, Any]], curves: dict, sweep: Sweep, folder: Path,
          run_url: Callable[[str], str] | None = None) -> dict[str, Path]:
    files = {"markdown": folder / "ablation.md", "csv": folder / "ablation.csv", "plot": folder / "ablation.png"}
    files["markdown"].write_text(markdown(rows, run_url))
    with files["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, curves, sweep, files["plot"])
    return files
