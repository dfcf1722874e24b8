"""Running a parsed sweep: Ray Tune over TorchTrainer trials, one MLflow child run per trial
under one parent run, and the ablation table and plot at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray
import ray.tune
from mlflow import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from dcgan_dist import config, placement, train
from dcgan_dist.tracking import training_run
from dcgan_dist.util import first_line, redact
from tuning import report, space, tracking
from tuning.space import Sweep


def search_space(sweep: Sweep) -> dict[str, Any]:
    """The dimensions as Tune's param_space, keyed by config path."""
    param_space = {}
    for d in sweep.dimensions:
        if d.distribution == "choice":
            param_space[d.path] = ray.tune.choice(d.grid)
        elif d.grid:
            param_space[d.path] = ray.tune.grid_search(d.grid)
        elif d.distribution == "uniform":
            param_space[d.path] = ray.tune.uniform(d.low, d.high)
        elif d.distribution == "loguniform":
            param_space[d.path] = ray.tune.loguniform(d.low, d.high)
        else:
            param_space[d.path] = ray.tune.randint(int(d.low), int(d.high))
    return param_space


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep_name: str, parent_run_id: str, train_storage: str,
              dimensions: list[space.Dimension], repeated: bool, start_timeout_s: float) -> None:
    """One trial: the base config with this trial's values, trained by its own TorchTrainer,
    into a child run named by what it varies (space.trial_label). A trial whose workers cannot all be
    placed within `start_timeout_s` fails: Ray Train tries to start its worker group
    CONTROLLER_FAILURE_LIMIT + 1 times, each waiting this share of the bound."""
    trial_id = ray.tune.get_context().get_trial_id()
    # The trial id is stable across Tuner.restore, so a resumed trial resumes its Train run
    # (and its MLflow child run) from its own latest checkpoint.
    cfg = space.trial_config(base, params, run_name=f"{sweep_name}-{trial_id}", parent_run_id=parent_run_id,
                             storage_path=train_storage)
    # Ray Train hands this variable from the process that calls fit() to its controller.
    os.environ[WORKER_GROUP_START_TIMEOUT] = str(start_timeout_s / (train.CONTROLLER_FAILURE_LIMIT + 1))
    launch = train.launch_info(cfg, "tuning.sweep")
    label = space.trial_label(dimensions, params, trial_id, repeated)
    tracking.name_trial(cfg.tracking.tracking_uri, launch["mlflow_run_id"], label, trial_id)
    try:
        train.build_trainer(cfg, callbacks=[TuneReportCallback()], launch=launch).fit()
    except BaseException:
        end_failed_unless_stopped(cfg.tracking.tracking_uri, launch["mlflow_run_id"], ray.util.get_current_placement_group())
        raise


def end_failed_unless_stopped(uri: str, run_id: str, group) -> None:
    """A trial's fit() raised: its run ends FAILED, unless Tune is stopping the trial (its scheduler, or the
    sweep's interrupt). Stopping removes the trial's placement group `group`, which kills the trial's
    TrainController, so fit() raises ActorDiedError here with nothing wrong with the training: the sweep's
    driver ends that run KILLED (TrialEnds, finish), and a FAILED written here could land after it."""
    try:
        stopped = group is not None and ray.util.placement_group_table(group).get("state") == "REMOVED"
    except Exception:  # noqa: BLE001 - Ray itself is going away: nothing says Tune stopped the trial
        stopped = False
    if not stopped:
        training_run.end_failed(uri, run_id)


WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


TRIAL_DRIVER_CPU = 0.01  # the trial's own process only drives its TorchTrainer


def plan_resources(sweep: Sweep, nodes: list[dict[str, float]], at_most: bool) -> tuple[int, int]:
    """(trials at once, CPUs per worker) such that every running trial's workers fit at once
    beside the trial drivers: a trial whose workers cannot be placed would wait forever. `nodes`
    is the cluster at the largest its autoscaler may make it (`at_most`), or as it is now when
    that is unknown: then --max-concurrent (or what fits now, at least 1) is trusted, and trials
    wait for the nodes the autoscaler adds for their workers."""
    cluster, workers = sweep.base.cluster, sweep.base.worker_range[1]
    request = placement.worker_request(cluster, cluster.cpus_per_worker or 1)

    def room(trials: int) -> list[dict[str, float]]:  # Ray may place each trial's driver on any node
        return placement.reserve_cpus(nodes, TRIAL_DRIVER_CPU * trials)

    fit = 0
    while (not sweep.max_concurrent or fit < sweep.max_concurrent) and \
            placement.workers_that_fit(room(fit + 1), request) >= (fit + 1) * workers:
        fit += 1
    one_trial = f"{workers} workers of {request}"
    if at_most:
        if fit < 1:
            raise RuntimeError(f"one trial needs {one_trial}; the cluster, at the largest its autoscaler may make it, has {nodes}")
        at_once = fit
        if sweep.max_concurrent > at_once:
            print(f"--max-concurrent {sweep.max_concurrent}: only {at_once} trials fit at once in {nodes}; running {at_once}")
    else:
        at_once = sweep.max_concurrent or max(fit, 1)
        if at_once > fit:
            print(f"{fit} trials of {one_trial} fit on the nodes up now and the largest size of the cluster is unknown "
                  f"(its autoscaler does not publish its node groups); running {at_once} at once, whose workers wait for "
                  "the nodes the autoscaler adds. Give --max-concurrent what the cluster holds at its largest.")
    per_worker = placement.cpus_per_worker(cluster, room(at_once), workers * at_once)  # the same rule as one run's
    return at_once, per_worker


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


ENDED: set[str] = set()  # the trials that ended in this process: completed, stopped by the scheduler, or errored
# Where TrialEnds ends the runs of stopped trials (run_sweep sets it: the client, the last step).
# The module's, as ENDED: Tune pickles the callback into the experiment's state, which must
# not hold the tracking URI (it may carry credentials).
STOPPING: dict[str, Any] = {}


class TrialEnds(ray.tune.Callback):
    """Records in ENDED the trials Tune ended by itself, and ends KILLED, at once, the run of a
    trial the scheduler stopped before its last step. Tune calls on_trial_complete before it
    stops the trial, so the trial's own process, on its way down, finds the run ended already
    (end_failed_unless_stopped) and the MLflow UI does not show it running until the sweep ends.
    Tune's run config is pickled with the experiment and a restored sweep gets a copy of it: the
    set is the module's, not the copy's. Trials an interrupt stops are stopped without these calls."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        ENDED.add(trial.trial_id)
        last = trial.last_result or {}
        if STOPPING and last.get("mlflow_run_id") and report.short_of_the_end(last, STOPPING["max_steps"]):
            try:
                tracking.end_stopped_trial(STOPPING["client"], last["mlflow_run_id"])
            except Exception as e:  # noqa: BLE001 - an exception here would fail the trial; finish() ends it again
                print(f"MLflow: could not end stopped trial {trial.trial_id}'s run ({redact(first_line(e))}); "
                      "the sweep ends it when it finishes", file=sys.stderr)

    def on_trial_error(self, iteration, trials, trial, **info):
        ENDED.add(trial.trial_id)


@contextlib.contextmanager
def interruptible():
    """Ctrl-C (SIGINT) stops the sweep as Tune's own handler would (SIGUSR1: running trials
    stopped, the experiment's state saved) and is remembered: the list it yields holds the
    signal once one came. A second Ctrl-C raises KeyboardInterrupt."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_interrupt(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("Interrupted: stopping the running trials; Ctrl-C again to stop at once", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        with environment({"TUNE_DISABLE_SIGINT_HANDLER": "1"}):  # Tune's handler would take the first Ctrl-C silently
            yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def make_tuner(sweep: Sweep, trainable, tune_path: str, at_once: int) -> ray.tune.Tuner:
    """The sweep's Tuner: restored from `tune_path` where this sweep ran before, else new."""
    if ray.tune.Tuner.can_restore(tune_path):
        print(f"Resuming sweep {sweep.sweep_name} from {tune_path}: finished trials are kept")
        return ray.tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if sweep.scheduler == "asha":
        # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial
        # that reaches its last step must instead finish by itself (close its run, log models).
        scheduler = ASHAScheduler(time_attr="step", max_t=sweep.base.loop.max_steps + 1,
                                  grace_period=sweep.grace_steps, reduction_factor=2)
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=ray.tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
            num_samples=sweep.num_samples, max_concurrent_trials=at_once,
        ),
        run_config=ray.tune.RunConfig(name=sweep.sweep_name, storage_path=sweep.base.tracking.storage_path,
                                      callbacks=[TrialEnds()]),
    )


def outcome(rows: list[dict[str, Any]], interrupted: bool = False) -> tuple[str, int, str]:
    """(the parent run's MLflow status, the exit code, a line saying why). An interrupted sweep
    (trials that never ran or were cut off: Tune returns with them only when stopped) ends
    KILLED, exit 130; the sweep fails when no trial gave a result: every trial errored, or
    (never from validated input: the CLI refuses an empty space and --num-samples 0) there
    were no trials."""
    count = {status: sum(row["status"] == status for row in rows) for status in report.STATUSES}
    failed = count["error"]
    if interrupted or count["not run"] or count["interrupted"]:
        return "KILLED", 130, (f"interrupted: {len(rows)} trials, {count['not run']} never ran, "
                               f"{count['interrupted']} cut off, {failed} failed")
    if not rows:
        return "FAILED", 1, "the sweep ran no trials, so there is nothing to compare"
    if failed == len(rows):
        return "FAILED", 1, f"every trial ({failed}) failed; see the errors above and the table"
    return "FINISHED", 0, f"{len(rows)} trials, {failed} failed"


def finish(client: MlflowClient, parent_id: str, sweep: Sweep, results, resumed: bool, interrupted: bool = False) -> int:
    """Close the trials' runs that no process closed, give the parent the best trial's summary,
    the table, the plot and the saved view of the comparison, and close it. An interrupted
    sweep's table lists the trials it cut off and those that never ran."""
    trials = report.tune_trials(results)
    cut_off = {trial.trial_id for trial in trials or [] if trial.trial_id not in ENDED} if interrupted else set()
    rows = report.trial_rows(results, sweep, trials, cut_off)
    if interrupted:
        rows += report.missing_trials(rows, sweep)
    for row in rows:  # ASHA's stops kill the trial's workers before they can close their run (TrialEnds did, if it could)
        if row["status"] == "stopped early" and row["mlflow_run_id"]:
            tracking.end_stopped_trial(client, row["mlflow_run_id"])
        elif row["status"] == "interrupted" and row["mlflow_run_id"]:
            # Cut off by the interrupt: KILLED, whatever the trial's processes wrote on their way down
            # (run_trial's handler stays out of it, its placement group removed; a worker might not).
            client.set_terminated(row["mlflow_run_id"], status="KILLED")
    status, code, why = outcome(rows, interrupted)
    experiment_id = client.get_run(parent_id).info.experiment_id
    # A trial cut off by an interrupt, or whose process died, never closed its run.
    tracking.close_open_trials(client, experiment_id, parent_id, tracking.KILLED if code == 130 else tracking.FAILED)
    labels = {run.info.run_id: run.info.run_name for run in tracking.trial_runs(client, experiment_id, parent_id)}
    uri = sweep.base.tracking.tracking_uri
    if rows:
        tracking.summarize(client, parent_id, rows, sweep, labels)
        with tempfile.TemporaryDirectory() as folder:
            names = {row["trial"]: labels.get(row["mlflow_run_id"], row["trial"]) for row in rows}
            curves = {names.get(trial, trial): curve for trial, curve in report.trial_curves(results, sweep.metric).items()}
            files = report.write(rows, curves, sweep, Path(folder),
                                 run_url=lambda run_id: tracking.run_url(uri, experiment_id, run_id))
            for path in files.values():
                client.log_artifact(parent_id, str(path))
            print(files["markdown"].read_text())
    link = tracking.save_view(client, experiment_id, parent_id, sweep, len(rows))
    client.set_terminated(parent_id, status=status)
    print(f"MLflow parent run: {parent_id} ({why}{', resumed' if resumed else ''})")
    print(f"Compare the trials: {link}")
    if code:
        print(f"The sweep {'was interrupted' if code == 130 else 'failed'}: {why}", file=sys.stderr)
    return code


def connect(address: str) -> None:
    """Join the Ray cluster the CLI resolved (tuning.sweep.ray_target), saying which."""
    if ray.is_initialized():
        print(f"Ray: this process's instance at {ray.get_runtime_context().gcs_address}")
        return
    if address == "local":
        print("Ray: a new local instance on this machine (no --ray-address, no RAY_ADDRESS, none running here)")
    else:
        print(f"Ray: joining the cluster at {redact(address)}")
    ray.init(address=address)


def run_sweep(sweep: Sweep) -> int:
    base = sweep.base
    connect(base.cluster.ray_address or "local")
    at_once, base.cluster.cpus_per_worker = plan_resources(sweep, *placement.cluster_nodes())

    tune_path = join(base.tracking.storage_path, sweep.sweep_name)
    client = MlflowClient(base.tracking.tracking_uri)
    parent_id, resumed = tracking.parent_run(client, sweep, tune_path)
    STOPPING.update(client=client, max_steps=base.loop.max_steps)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=config.flatten(base), sweep_name=sweep.sweep_name, parent_run_id=parent_id,
            train_storage=join(base.tracking.storage_path, f"{sweep.sweep_name}-trials"),
            dimensions=sweep.dimensions, repeated=sweep.num_samples > 1, start_timeout_s=sweep.trial_start_timeout_s,
        ),
        # Its TorchTrainer's workers hold the real resources; Tune refuses an empty request.
        {"CPU": TRIAL_DRIVER_CPU},
    )
    # Reports before a trial's first evaluation carry no score; Tune's strict check (in this
    # process) would fail the trial on them (ASHA skips them; the first rung comes after the first score).
    lenient = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"} if sweep.metric.startswith("eval/") else {}
    try:
        with environment(lenient), interruptible() as interrupt:
            results = make_tuner(sweep, trainable, tune_path, at_once).fit()
        return finish(client, parent_id, sweep, results, resumed, interrupted=bool(interrupt))
    except BaseException as error:
        # The parent run was opened by this process, not by mlflow.start_run: nothing else closes it.
        # A second Ctrl-C (Tune takes the first one) ends the parent and the open trials KILLED.
        status = tracking.KILLED if isinstance(error, KeyboardInterrupt) else tracking.FAILED
        experiment_id = client.get_run(parent_id).info.experiment_id
        tracking.close_open_trials(client, experiment_id, parent_id, status)
        client.set_terminated(parent_id, status=status)
        raise
