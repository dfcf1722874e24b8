"""MLflow's basic-auth app for real: a `mlflow server --app-name basic-auth` on 127.0.0.1 with the
deploy's settings (infra/mlflow/basic_auth.ini, its store moved to a sqlite file), the user the
deploy's Job creates (infra/mlflow/create_user.py), a training run that logs in as that user, and
the preflight's exit 2 without credentials or with a wrong password, before Ray starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcgan_dist.tracking.store import TrackingError, check_reachable
from dcgan_dist.train import main
from tests.conftest import free_port, train_args

REPO = Path(__file__).resolve().parents[1]
ADMIN = ("admin", "admin-pass-for-tests")
USER = ("dcgan-train", "train-pass-for-tests")
STEPS = 4


class AuthServer:
    """`mlflow server --app-name basic-auth`: sqlite backend and auth store, local artifacts, the
    admin created at the first start from MLFLOW_AUTH_ADMIN_* (as the Deployment does)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        settings = (REPO / "infra" / "mlflow" / "basic_auth.ini").read_text()
        settings, count = re.subn(r"^database_uri = .*$", f"database_uri = sqlite:///{folder / 'auth.db'}", settings, flags=re.MULTILINE)
        assert count == 1
        (folder / "basic_auth.ini").write_text(settings)
        self.env = os.environ | {
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",
        }
        self.process = None

    def start(self, timeout_s: float = 180.0) -> AuthServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            env=self.env, cwd=self.folder, stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer /health within {timeout_s} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = AuthServer(tmp_path_factory.mktemp("mlflow-auth")).start()
    try:
        # the deploy's one-shot Job, as the admin; a second run finds the user and keeps it
        env = os.environ | {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
                            "MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]}
        for expected in ("created", "exists"):
            job = subprocess.run([sys.executable, str(REPO / "infra" / "mlflow" / "create_user.py")], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert job.returncode == 0 and job.stdout.strip() == f"user {USER[0]}: {expected}", job.stdout + job.stderr
            assert USER[1] not in job.stdout + job.stderr and ADMIN[1] not in job.stdout + job.stderr
        yield server
    finally:
        server.stop()


def without_credentials(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}


@pytest.mark.slow
def test_without_credentials_the_cli_exits_2_naming_the_server_before_ray_starts(auth_server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", *train_args(tmp_path, auth_server.uri, max_steps=STEPS)],
        env=without_credentials(os.environ) | {"PYTHONPATH": str(REPO)}, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m dcgan_dist.train: error: ") and auth_server.uri in lines[0]
    assert "HTTP 401" in lines[0] and "MLFLOW_TRACKING_USERNAME" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert "Ray" not in result.stdout + result.stderr and not (tmp_path / "ray_results").exists()


@pytest.mark.slow
def test_a_wrong_password_exits_2_naming_the_user_not_the_password(auth_server, tmp_path, monkeypatch, capsys):
    import ray

    ray_was_up = ray.is_initialized()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    assert main(train_args(tmp_path, auth_server.uri, max_steps=STEPS)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and auth_server.uri in error and "HTTP 401" in error, error
    assert repr(USER[0]) in error and "not-the-password" not in error and "MLFLOW_TRACKING_PASSWORD" in error
    assert ray.is_initialized() == ray_was_up  # the preflight failed before Ray was started


@pytest.mark.slow
def test_the_preflight_takes_credentials_in_the_uri_and_names_the_user_not_the_password(auth_server, monkeypatch):
    """http://user:password@host:port, as MLflow's client accepts it: the preflight reaches the
    host and sends the user's credentials (environment variables, when set, go first)."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def with_password(password: str) -> str:
        return auth_server.uri.replace("http://", f"http://{USER[0]}:{urllib.parse.quote(password, safe='')}@")

    check_reachable(with_password(USER[1]))
    with pytest.raises(TrackingError) as wrong:
        check_reachable(with_password("not/the+password"))
    assert str(wrong.value).startswith(f"MLflow tracking server {auth_server.uri}: ") and "HTTP 401" in str(wrong.value)
    assert repr(USER[0]) in str(wrong.value) and "not" + "/the" not in str(wrong.value) and "not%2Fthe" not in str(wrong.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    check_reachable(with_password("not/the+password"))  # as MLflow's client: the variables' credentials win


@pytest.mark.slow
def test_with_the_users_credentials_a_run_trains_and_is_on_the_server(auth_server, ray_local, tmp_path, monkeypatch):
    """The session's Ray was started without credentials: the driver hands its own to the
    workers (train.worker_env), as a pod's env would give them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER[1])
    args = train_args(tmp_path, auth_server.uri, experiment="auth", max_steps=STEPS, log_every=2, sample_every=STEPS,
                      checkpoint_every=STEPS, eval_every=0) + ["--no-register-models"]  # registering costs a minute on CI's 2 CPUs
    assert main(args) == 0

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])  # the admin reads it back
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    client = MlflowClient(auth_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("auth").experiment_id])
    assert run.info.status == "FINISHED" and run.info.user_id == USER[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_d")] == list(range(1, STEPS + 1))
    assert any(a.path == "images" for a in client.list_artifacts(run.info.run_id)), "artifacts go up through the server too"
