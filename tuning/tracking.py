"""The sweep in MLflow: the parent run, the trials' names, the best trial's summary on the
parent, and the saved view of the MLflow UI that opens on the comparison.

The view is what the MLflow 3.17 UI itself saves ("Save as new view"): an experiment tag
`mlflow.sharedViewState.<key>` holding {name, createdAt, updatedAt, state}, where state is the
experiment page's search (a filter, an order) and its UI state (columns, charts, how many runs
the charts show), as JSON. `#/experiments/<id>/runs?viewStateShareKey=<key>` opens it; the UI
also lists it among the experiment's saved views.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, RunStatus
from mlflow.exceptions import MlflowException

from dcgan_dist import config
from dcgan_dist.tracking import store
from dcgan_dist.util import redact
from tuning.space import Sweep

# The experiment tag the UI's chart view reads as the experiment's primary metric, and the
# prefix of its saved views (mlflow/server/js: constants `mlflow.experiment.primaryMetric.name`,
# `mlflow.sharedViewState.`).
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s address, for a sqlite or file store
PARENT_TAG, TRIAL_TAG = "mlflow.parentRunId", "sweep.trial"


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of this store is browsed: the server itself, or a local `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return redact(tracking_uri).rstrip("/")
    return LOCAL_UI


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def view_url(tracking_uri: str, experiment_id: str, parent_id: str) -> str:
    # workflowType: MLflow 3.17's UI otherwise opens in its GenAI mode, where runs are "evaluation runs"
    return (f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={view_key(parent_id)}"
            "&compareRunsMode=CHART&workflowType=machine_learning")


def view_key(parent_id: str) -> str:
    return f"sweep-{parent_id}"


def parent_run(client: MlflowClient, sweep: Sweep, tune_path: str) -> tuple[str, bool]:
    """The sweep's MLflow run: the one this sweep name and storage made before, or a new one.
    Its params are the search space (`search.*`), the sweep's settings (`sweep.*`) and the
    config every trial shares (`base.*`, without the searched keys): nothing reads as one more
    trial's values."""
    experiment_id = store.ensure_experiment(sweep.base.tracking.tracking_uri, sweep.base.tracking.experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`sweep.path` = '{tune_path}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = client.create_run(experiment_id, run_name=f"sweep {sweep.sweep_name}",
                            tags={"sweep.path": tune_path, "sweep.kind": "parent"})
    searched = {d.path for d in sweep.dimensions}
    params = {f"search.{d.path}": d.describe() for d in sweep.dimensions} | {
        "sweep.metric": sweep.metric, "sweep.mode": sweep.mode, "sweep.scheduler": sweep.scheduler,
        "sweep.num_samples": sweep.num_samples, "sweep.grace_steps": sweep.grace_steps,
    } | {f"base.{path}": value for path, value in config.flatten(sweep.base).items() if path not in searched}
    store.log_params(client, run.info.run_id, params)
    return run.info.run_id, False


def name_trial(tracking_uri: str, run_id: str, label: str, trial_id: str) -> None:
    """A trial's child run named by what it varies (the same name again on a resume)."""
    client = MlflowClient(tracking_uri)
    client.update_run(run_id, name=label)
    client.set_tag(run_id, TRIAL_TAG, trial_id)
    client.set_tag(run_id, "sweep.kind", "trial")


def summarize(client: MlflowClient, parent_id: str, rows: list[dict[str, Any]], sweep: Sweep, labels: dict[str, str]) -> None:
    """The best trial's score as the parent's metric `best/<metric>`, its searched values as
    params `best.<key>` and its name and run as tags. Params cannot change: a resumed sweep whose
    best trial changed records the new values as tags of the same names."""
    best_column = f"best {sweep.metric}"
    scored = [row for row in rows if row[best_column] is not None]
    if not scored:
        return
    best = scored[0]  # rows come sorted, best first
    client.log_metric(parent_id, f"best/{sweep.metric}", float(best[best_column]))
    values = {f"best.{d.path}": str(best[d.path]) for d in sweep.dimensions}
    try:
        client.log_batch(parent_id, params=[Param(key, value) for key, value in values.items()])
    except MlflowException:
        for key, value in values.items():
            client.set_tag(parent_id, key, value)
    if best["mlflow_run_id"]:
        client.set_tag(parent_id, "sweep.best_run_id", best["mlflow_run_id"])
        client.set_tag(parent_id, "sweep.best_trial", labels.get(best["mlflow_run_id"], best["trial"]))


def trial_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=1000)


def end_stopped_trial(client: MlflowClient, run_id: str) -> None:
    """A trial the scheduler stopped: tagged so, and KILLED (not FAILED: nothing went wrong)."""
    client.set_tag(run_id, "sweep.stopped_early", "true")
    client.set_terminated(run_id, status=KILLED)


def close_open_trials(client: MlflowClient, experiment_id: str, parent_id: str, status: str) -> int:
    """End the trials' runs that are still RUNNING (their process was stopped before it could)."""
    open_runs = [run for run in trial_runs(client, experiment_id, parent_id) if run.info.status == "RUNNING"]
    for run in open_runs:
        client.set_terminated(run.info.run_id, status=status)
    return len(open_runs)


def save_view(client: MlflowClient, experiment_id: str, parent_id: str, sweep: Sweep, num_trials: int) -> str:
    """The experiment's saved view of this sweep: its trials only (not the parent), ranked on
    the sweep's metric, the searched keys and the metric as the table's columns, and charts of
    every trial (the UI's default is the first 10 runs): the parallel coordinates of the searched
    keys against the metric, the metric per trial and its curves. Returns the link that opens it."""
    metric, keys = sweep.metric, [d.path for d in sweep.dimensions]
    section = "sweep-section"

    def card(kind: str, uuid: str, **fields) -> dict[str, Any]:
        return {"uuid": uuid, "type": kind, "runsCountToCompare": max(num_trials, 10), "metricSectionId": section,
                "deleted": False, "isGenerated": False} | fields

    charts = [
        card("PARALLEL", "sweep-parallel", selectedParams=keys, selectedMetrics=[metric], showAllRuns=True),
        card("BAR", "sweep-bar", metricKey=metric),
        card("LINE", "sweep-line", metricKey=metric, xAxisKey="step", yAxisKey="metric", scaleType="linear",
             xAxisScaleType="linear", lineSmoothness=0, selectedXAxisMetricKey="", yAxisExpressions=[],
             ignoreOutliers=False, useGlobalXaxisKey=False, useGlobalLineSmoothing=False, displayPoints=True,
             range={"xMin": None, "xMax": None, "yMin": None, "yMax": None}),
    ]
    state = {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_id}'",
        "orderByKey": f"metrics.`{metric}`", "orderByAsc": sweep.mode == "min",
        "selectedColumns": [f"params.`{key}`" for key in keys] + [f"metrics.`{metric}`", "attributes.`Duration`"],
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": f"sweep {sweep.sweep_name}: {metric}", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False}],
        "isAccordionReordered": True, "hideEmptyCharts": True,
    }
    now = int(time.time() * 1000)
    envelope = {"name": f"sweep {sweep.sweep_name}", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, SAVED_VIEW_PREFIX + view_key(parent_id), json.dumps(envelope))
    client.set_experiment_tag(experiment_id, PRIMARY_METRIC_TAG, metric)
    link = view_url(sweep.base.tracking.tracking_uri, experiment_id, parent_id)
    client.set_tag(parent_id, "sweep.view", link)
    # The run page's description: the way to the comparison, and the best trial.
    best = client.get_run(parent_id).data.tags.get("sweep.best_trial")
    client.set_tag(parent_id, "mlflow.note.content", f"Sweep `{sweep.sweep_name}` over {', '.join(keys)}, ranked on `{metric}` "
                   f"({sweep.mode}).{f' Best trial: `{best}`.' if best else ''} [Compare the trials]({link})")
    return link


KILLED, FAILED = RunStatus.to_string(RunStatus.KILLED), RunStatus.to_string(RunStatus.FAILED)
