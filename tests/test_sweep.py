"""`python -m tuning.sweep` on a real local Ray instance, into a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import start_local_ray, train_args
from tuning import report, space, sweep


def sweep_args(tmp_path, tracking_uri, *search, **overrides) -> list[str]:
    options = {"max_steps": 8, "batch_size": 16, "log_every": 4, "checkpoint_every": 8} | overrides
    args = train_args(tmp_path, tracking_uri, **options)
    for spec in search:
        args += ["--search", spec]
    return args


def runs_by_kind(client: MlflowClient, experiment: str = "tests"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.kind") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.parametrize(
    "args, option",
    [
        (["--search", "learning_rate=1e-3"], "learning_rate"),
        (["--search", "batch_size=lots"], "--batch-size"),
        (["--search", "lr="], "--search"),
        (["--search", "bn=paper,sometimes"], "--bn"),
        (["--search", "lr=-1,2e-4"], "--lr"),
        (["--search", "lr=loguniform:0:1e-3"], "loguniform"),
        ([], "empty"),
        (["--search", "lr=1e-4", "--metric", "loss_d"], "--mode"),
        # spaces of no trials at all: refused here, not a sweep that ends with nothing
        (["--search", "beta1=choice:,"], "--search"),
        (["--search", "lr=,"], "--search"),
        (["--search", "lr=1e-4", "--num-samples", "0"], "--num-samples"),
        (["--search", "lr=1e-4", "--grace-steps", "-1"], "--grace-steps"),
    ],
)
def test_bad_search_exits_2_naming_it(args, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(args)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.slow
def test_bad_key_exits_2_before_any_trial(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tuning.sweep", "--search", "depth=3,4"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "depth" in result.stderr and "Ray" not in result.stdout + result.stderr


def test_search_keys_are_config_paths_and_the_paper_ablation():
    settings = sweep.parse_args(["--search", "optim.lr=1e-4,2e-4", "--search", "beta1=uniform:0.1:0.9"])
    assert [(d.path, d.grid, d.distribution) for d in settings.dimensions] == [
        ("optim.lr", [1e-4, 2e-4], ""), ("optim.beta1", [], "uniform")
    ]
    paper = sweep.parse_args(["--ablation", "paper"])
    assert {d.path: d.grid for d in paper.dimensions} == {
        "optim.beta1": [0.5, 0.9], "optim.lr": [2e-4, 1e-3], "model.bn": ["paper", "all", "none"]
    }
    # trials are ranked on FID when evaluation is on (the default), on G's loss when it is off,
    # and ASHA's first rung waits for the first score
    assert paper.scheduler == "asha" and (paper.metric, paper.mode) == ("eval/fid", "min")
    assert paper.grace_steps >= paper.base.eval.eval_every
    assert sweep.parse_args(["--ablation", "paper", "--eval-every", "0"]).metric == "loss_g"
    # training flags apply to every trial; sweeps do not register a model version per trial, nor
    # log each evaluation's models (the flags opt in)
    flagged = sweep.parse_args(["--ablation", "paper", "--max-steps", "77", "--workers-per-trial", "2", "--batch-size", "64"])
    assert flagged.base.loop.max_steps == 77 and flagged.base.cluster.num_workers == "2"
    assert flagged.base.tracking.register_models is False and flagged.base.tracking.logged_models == "champion-and-last"
    opted = sweep.parse_args(["--ablation", "paper", "--register-models", "--logged-models", "every-eval"]).base.tracking
    assert opted.register_models is True and opted.logged_models == "every-eval"


def test_the_paper_ablation_uses_only_the_configs_own_choices():
    # the ablation names BatchNorm placements; the config (from models) owns the list
    from dcgan_dist import config

    assert set(space.ABLATIONS["paper"]["model.bn"]) <= set(config.BN_CHOICES)
    assert sweep.build_parser()._option_string_actions["--bn"].choices == config.BN_CHOICES


def test_a_trials_config_is_the_base_with_its_values_under_the_parent():
    base = sweep.parse_args(["--search", "lr=1e-4,2e-4", "--max-steps", "33"]).base
    from dcgan_dist import config

    cfg = space.trial_config(config.flatten(base), {"optim.lr": 1e-4}, run_name="s-t1", parent_run_id="p1", storage_path="/x")
    assert (cfg.optim.lr, cfg.loop.max_steps, cfg.tracking.run_name, cfg.tracking.parent_run_id, cfg.tracking.storage_path) == (
        1e-4, 33, "s-t1", "p1", "/x")
    assert base.optim.lr == 2e-4  # the base is not changed


def errored_result(path, trial_id: str):
    """What Tune hands back for a trial that failed before its first report: no metrics but its id."""
    from ray.tune import Result

    return Result(metrics={"trial_id": trial_id}, checkpoint=None, error=RuntimeError("worker died"), path=str(path))


def every_trial_errored(tmp_path):
    settings = sweep.parse_args(["--search", "lr=1e-4,2e-4", "--scheduler", "none"])
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "params.json").write_text(json.dumps({"optim.lr": 1e-4}))  # Tune writes it at a trial's start
    return settings, [errored_result(tmp_path / "t1", "abc_00000"), errored_result(tmp_path / "t2", "abc_00001")]


def test_trials_that_all_errored_are_listed_as_errored(tmp_path):
    settings, results = every_trial_errored(tmp_path)
    rows = report.trial_rows(results, settings)
    assert [(row["trial"], row["optim.lr"], row["status"], row["steps"]) for row in rows] == [
        ("abc_00000", 1e-4, "error", 0), ("abc_00001", None, "error", 0)]
    assert rows[0]["why"] == "worker died"  # the table says why
    files = report.write(rows, report.trial_curves(results, settings.metric), settings, tmp_path)
    assert files["markdown"].read_text().count("| error |") == 2 and files["plot"].stat().st_size > 0


def test_the_curves_of_trials_with_one_evaluation_each_are_points():
    settings = sweep.parse_args(["--search", "lr=1e-4,2e-4"])
    rows = [{"optim.lr": lr, "best eval/fid": fid} for lr, fid in ((1e-4, 50.0), (2e-4, 40.0))]
    figure = report.draw(rows, {"t1": ([200], [50.0]), "t2": ([200], [40.0])}, settings)
    curves = figure.axes[-1].lines
    assert len(curves) == 2 and all(line.get_marker() not in (None, "", "None", " ") for line in curves)


def test_the_tables_run_ids_link_to_the_mlflow_ui():
    from tuning import tracking

    row = {"trial": "t1", "status": "completed", "mlflow_run_id": "abc"}
    table = report.markdown([row], run_url=lambda run_id: tracking.run_url("http://user:pw@mlflow:5000/", "7", run_id))
    assert "| [abc](http://mlflow:5000/#/experiments/7/runs/abc) |" in table  # no credentials in a link
    assert tracking.run_url("sqlite:///mlflow.db", "7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc"


def test_a_sweep_whose_trials_all_errored_fails_and_so_does_its_parent_run(tmp_path, mlflow_sqlite, capsys):
    from tuning import run

    settings, results = every_trial_errored(tmp_path)
    client = MlflowClient(mlflow_sqlite)
    parent = client.create_run(client.create_experiment("tests")).info.run_id
    assert run.finish(client, parent, settings, results, resumed=False) == 1
    assert client.get_run(parent).info.status == "FAILED"
    assert "ablation.md" in {a.path for a in client.list_artifacts(parent)}
    assert "every trial (2) failed" in capsys.readouterr().err


def test_a_sweep_of_no_trials_says_so_instead_of_crashing(tmp_path, mlflow_sqlite, capsys):
    from tuning import run

    settings = sweep.parse_args(["--search", "lr=1e-4"])
    client = MlflowClient(mlflow_sqlite)
    parent = client.create_run(client.create_experiment("tests")).info.run_id
    assert run.finish(client, parent, settings, [], resumed=False) == 1
    assert client.get_run(parent).info.status == "FAILED"
    assert "ran no trials" in capsys.readouterr().err
    assert run.outcome([{"status": "error"}, {"status": "completed"}])[:2] == ("FINISHED", 0)


def test_the_environment_is_set_only_inside_and_restored_as_it_was(monkeypatch):
    from tuning import run

    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "0")
    monkeypatch.delenv("TUNE_RESULT_BUFFER_LENGTH", raising=False)
    with pytest.raises(KeyError), run.environment({"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_RESULT_BUFFER_LENGTH": "1"}):
        assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "1"
        raise KeyError("a failing sweep")
    assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "0" and "TUNE_RESULT_BUFFER_LENGTH" not in os.environ


@pytest.mark.slow
def test_grid_sweep_leaves_named_trials_a_summary_and_the_table(ray_local, mlflow_server, tmp_path):
    # two dimensions, two trials (each trial is a Ray Train run: its workers' start is most of its time),
    # on a real MLflow server
    args = sweep_args(tmp_path, mlflow_server.uri, "lr=2e-4,1e-3", "beta1=0.9", experiment="sweep-grid") + [
        "--scheduler", "none", "--sweep-name", "grid"]
    strict_switch = os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    assert sweep.main(args) == 0
    assert os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING") == strict_switch  # set for the sweep's fit only

    client = MlflowClient(mlflow_server.uri)
    parents, children = runs_by_kind(client, "sweep-grid")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(child.data.tags["mlflow.parentRunId"] == parent.info.run_id for child in children)
    pairs = {(float(c.data.params["optim.lr"]), float(c.data.params["optim.beta1"])) for c in children}
    assert pairs == {(2e-4, 0.9), (1e-3, 0.9)}  # beta1 0.9, not the default 0.5
    # each trial named by what it varies; the parent by the sweep, with no trial's params
    assert {c.info.run_name for c in children} == {"lr=2e-4 beta1=0.9", "lr=1e-3 beta1=0.9"}
    assert parent.info.run_name == "sweep grid"
    assert "optim.lr" not in parent.data.params and "base.optim.lr" not in parent.data.params
    assert parent.data.params["base.loop.max_steps"] == "8" and parent.data.params["search.optim.lr"] == "grid(0.0002, 0.001)"
    check_the_best_trial_summary(client, parent.info.run_id, children)
    assert all(child.info.status == "FINISHED" for child in children)
    assert all(len(client.get_metric_history(c.info.run_id, "loss_g")) == 8 for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation.csv", "ablation.png"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "ablation.csv")
    assert len(open(table).read().strip().splitlines()) == 1 + 2
    # the run ids of the markdown table are links to the runs in the MLflow UI
    markdown = open(client.download_artifacts(parent.info.run_id, "ablation.md")).read()
    experiment_id = parent.info.experiment_id
    for child in children:
        assert f"[{child.info.run_id}]({mlflow_server.uri}/#/experiments/{experiment_id}/runs/{child.info.run_id})" in markdown

    # Re-running the same sweep restores it: finished trials are not trained again.
    assert sweep.main(args) == 0
    parents_again, children_again = runs_by_kind(client, "sweep-grid")
    assert [p.info.run_id for p in parents_again] == [parent.info.run_id]
    assert {c.info.run_id for c in children_again} == {c.info.run_id for c in children}
    assert all(len(client.get_metric_history(c.info.run_id, "loss_g")) == 8 for c in children_again)


def check_the_best_trial_summary(client: MlflowClient, parent_id: str, children) -> None:
    """The parent holds the best trial's score and values, and the saved view of the UI."""
    parent = client.get_run(parent_id)
    best = min(children, key=lambda c: c.data.metrics["eval/fid"])
    assert parent.data.metrics["best/eval/fid"] == pytest.approx(best.data.metrics["eval/fid"])
    assert parent.data.params["best.optim.lr"] == best.data.params["optim.lr"]
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.tags["sweep.best_trial"] == best.info.run_name
    # the view: this sweep's trials (not the parent), ranked on the metric, every trial charted
    experiment = client.get_experiment(parent.info.experiment_id)
    key = parent.data.tags["sweep.view"].partition("viewStateShareKey=")[2].partition("&")[0]
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    state = json.loads(view["state"])
    assert parent_id in state["searchFilter"] and state["orderByKey"] == "metrics.`eval/fid`" and state["orderByAsc"]
    assert client.search_runs([experiment.experiment_id], state["searchFilter"]) and \
        {r.info.run_id for r in client.search_runs([experiment.experiment_id], state["searchFilter"])} == {c.info.run_id for c in children}
    parallel = [chart for chart in state["compareRunCharts"] if chart["type"] == "PARALLEL"]
    assert parallel[0]["selectedMetrics"] == ["eval/fid"] and state["runsHiddenMode"] == "SHOW_ALL"
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "eval/fid"


@pytest.mark.slow
def test_asha_stops_a_losing_trial_early(ray_local, mlflow_sqlite, tmp_path):
    # One trial learns (lr 2e-4); one barely moves (lr 1e-6), so its D loss stays near log 4
    # and ASHA (reduction factor 2), run one trial at a time, cuts it at the first rung.
    args = sweep_args(tmp_path, mlflow_sqlite, "lr=2e-4,1e-6", max_steps=16, checkpoint_every=16) + [
        "--max-concurrent", "1", "--metric", "loss_d", "--mode", "min", "--grace-steps", "4",
    ]
    assert sweep.main(args) == 0
    client = MlflowClient(mlflow_sqlite)
    _, children = runs_by_kind(client)
    assert len(children) == 2
    stopped = [c for c in children if c.data.tags.get("sweep.stopped_early") == "true"]
    assert stopped, "ASHA stopped no trial"
    for child in stopped:
        assert child.info.status == "KILLED"
        assert max(m.step for m in client.get_metric_history(child.info.run_id, "loss_d")) < 16
    learner = [c for c in children if float(c.data.params["optim.lr"]) == 2e-4]
    assert learner[0].info.status == "FINISHED"


class Trial:
    """What Tune's callbacks read of a trial (ray.tune.experiment.Trial)."""

    def __init__(self, trial_id: str, last_result: dict):
        self.trial_id, self.last_result = trial_id, last_result


def test_the_run_of_a_trial_the_scheduler_stops_ends_killed_before_tune_stops_it(mlflow_sqlite, monkeypatch):
    # Tune calls on_trial_complete before it stops the trial: the run is KILLED before the trial's
    # own process can see its TrainController die (a FAILED it wrote could land after the sweep's KILLED).
    import pickle

    from tuning import run

    client = MlflowClient(mlflow_sqlite)
    experiment = client.create_experiment("stops")
    stopped, finished = (client.create_run(experiment).info.run_id for _ in range(2))
    monkeypatch.setattr(run, "STOPPING", {"client": client, "max_steps": 16})
    callback = pickle.loads(pickle.dumps(run.TrialEnds()))  # Tune pickles its run config with the experiment
    callback.on_trial_complete(0, [], Trial("t_00000", {"mlflow_run_id": stopped, "step": 8}))
    callback.on_trial_complete(0, [], Trial("t_00001", {"mlflow_run_id": finished, "step": 16}))  # reached its last step
    assert client.get_run(stopped).info.status == "KILLED" and client.get_run(stopped).data.tags["sweep.stopped_early"] == "true"
    assert client.get_run(finished).info.status == "RUNNING" and "sweep.stopped_early" not in client.get_run(finished).data.tags
    assert {"t_00000", "t_00001"} <= run.ENDED


@pytest.mark.slow
def test_a_trial_whose_placement_group_tune_removed_is_stopped_not_failed(ray_local, mlflow_sqlite):
    # Stopping a trial (ASHA, an interrupt) removes its placement group, which kills its TrainController:
    # fit() raises in run_trial with nothing wrong. Only a trial whose group is still there failed.
    from ray.util.placement_group import placement_group, remove_placement_group

    from tuning import run

    client = MlflowClient(mlflow_sqlite)
    experiment = client.create_experiment("stops")
    failed, stopped, outside = (client.create_run(experiment).info.run_id for _ in range(3))
    group = placement_group([{"CPU": 0.01}])
    ray_local.get(group.ready(), timeout=60)
    run.end_failed_unless_stopped(mlflow_sqlite, failed, group)
    remove_placement_group(group)
    run.end_failed_unless_stopped(mlflow_sqlite, stopped, group)
    run.end_failed_unless_stopped(mlflow_sqlite, outside, None)  # not in a placement group: a failure
    assert [client.get_run(r).info.status for r in (failed, stopped, outside)] == ["FAILED", "RUNNING", "FAILED"]


@pytest.mark.slow
def test_a_trial_whose_workers_cannot_be_placed_fails_within_its_bound(ray_local, mlflow_server, tmp_path, capsys):
    # Each worker asks for a resource no node has: Ray Train's worker group never starts, and
    # the trial fails after --trial-start-timeout-s (over Ray Train's start attempts) instead of waiting forever.
    args = sweep_args(tmp_path, mlflow_server.uri, "lr=2e-4", experiment="sweep-unplaced", eval_every=0,
                      worker_resources='{"no_such_node": 1}') + ["--scheduler", "none", "--trial-start-timeout-s", "3"]
    assert sweep.main(args) == 1
    out, err = capsys.readouterr()
    assert "every trial (1) failed" in err
    assert "| error |" in out and "worker group startup timed out" in out  # the table says why
    client = MlflowClient(mlflow_server.uri)
    parents, children = runs_by_kind(client, "sweep-unplaced")
    assert parents[0].info.status == "FAILED"
    assert [c.info.status for c in children] == ["FAILED"] and children[0].info.run_name == "lr=2e-4"


@pytest.fixture
def no_ray_here(ray_local):
    """This process's Ray stopped while the test runs (started again after): the sweep it starts
    and interrupts has a local instance of its own, as a user's sweep does. Interrupted while it
    had joined this session's instance, it left this process's GCS client waiting: the next
    training run's ray.nodes() hung in a whole-suite run here (and CI's pytest exited 1, silent,
    as Ray's GCS client exits a driver that loses its GCS)."""
    ray_local.shutdown()
    try:
        yield
    finally:
        start_local_ray()


@pytest.mark.slow
def test_an_interrupted_sweep_exits_130_ends_its_runs_killed_and_lists_the_trials_that_never_ran(no_ray_here, mlflow_server, tmp_path):
    import signal
    import time

    # Three trials one at a time, each far longer than the test waits: Ctrl-C while the first trains.
    args = sweep_args(tmp_path, mlflow_server.uri, "lr=2e-4,1e-3,5e-4", experiment="sweep-interrupted", eval_every=0,
                      max_steps=100000, checkpoint_every=50000) + ["--scheduler", "none", "--max-concurrent", "1"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "tuning.sweep", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(mlflow_server.uri)
    try:
        deadline = time.monotonic() + 240
        while not training(client, "sweep-interrupted"):
            assert process.poll() is None and time.monotonic() < deadline, "no trial started training"
            time.sleep(1)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, out[-3000:]
    assert "Ray: a new local instance" in out and "The sweep was interrupted" in out
    parents, children = runs_by_kind(client, "sweep-interrupted")
    assert parents[0].info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]  # the one that trained; the others never ran
    table = open(client.download_artifacts(parents[0].info.run_id, "ablation.md")).read()
    assert table.count("| not run |") == 2 and table.count("| interrupted |") == 1


def training(client: MlflowClient, experiment: str) -> bool:
    """Whether a trial of the sweep has logged a training step."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "metrics.loss_g > -1") if found else []
    return any("mlflow.parentRunId" in run.data.tags for run in runs)


def test_the_sweep_refuses_two_ray_addresses_that_disagree(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(space.SweepError, match="disagrees with RAY_ADDRESS"):
        sweep.ray_target("127.0.0.1:6380")
    assert sweep.ray_target("127.0.0.1:6379") == sweep.ray_target("") == "127.0.0.1:6379"


def test_trials_are_named_by_what_they_vary():
    dimensions = sweep.parse_args(["--ablation", "paper"]).dimensions
    params = {"optim.beta1": 0.5, "optim.lr": 1e-3, "model.bn": "paper"}
    assert space.trial_label(dimensions, params) == "beta1=0.5 lr=1e-3 bn=paper"
    assert space.trial_label(dimensions, params | {"optim.lr": 2e-4}, "run_trial_ab_00011", repeated=True) == \
        "beta1=0.5 lr=2e-4 bn=paper #11"


def test_an_interrupted_sweeps_table_lists_the_grids_trials_that_never_ran():
    settings = sweep.parse_args(["--search", "lr=1e-4,2e-4,5e-4", "--search", "beta1=0.5", "--num-samples", "2"])
    ran = [{"trial": "a", "optim.lr": 1e-4, "optim.beta1": 0.5, "steps": 4, "status": "interrupted", "why": "", "mlflow_run_id": "r"}]
    missing = report.missing_trials(ran, settings)
    assert sorted((row["optim.lr"], row["status"]) for row in missing) == [
        (1e-4, "not run"), (2e-4, "not run"), (2e-4, "not run"), (5e-4, "not run"), (5e-4, "not run")]
    assert set(missing[0]) == set(ran[0])
    from tuning import run

    assert run.outcome(ran + missing)[:2] == ("KILLED", 130) and run.outcome(ran, interrupted=True)[:2] == ("KILLED", 130)


def test_what_the_sweep_hands_to_ray_survives_pickling():
    import pickle

    from tuning import run

    dimensions = pickle.loads(pickle.dumps(sweep.parse_args(["--ablation", "paper"]).dimensions))
    assert space.trial_label(dimensions, {"optim.beta1": 0.9, "optim.lr": 2e-4, "model.bn": "none"}) == "beta1=0.9 lr=2e-4 bn=none"
    callback = pickle.loads(pickle.dumps(run.TrialEnds()))  # Tune pickles its run config with the experiment
    callback.on_trial_complete(0, [], Trial("abc_00001", {}))
    assert "abc_00001" in run.ENDED


def test_ctrl_c_stops_the_sweep_through_tunes_handler_and_is_remembered(monkeypatch):
    import signal

    from tuning import run

    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    forwarded = []
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest itself runs in the background (nohup, CI runners)
    previous_usr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: forwarded.append(signum))
    try:
        with run.interruptible() as interrupt:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            signal.raise_signal(signal.SIGINT)
            assert interrupt == [signal.SIGINT] and forwarded == [signal.SIGUSR1]
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C stops at once
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
    assert signal.getsignal(signal.SIGINT) is before and "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
