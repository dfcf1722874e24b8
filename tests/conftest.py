"""Fixtures that start real services: a local Ray instance, MLflow sqlite stores, a real MLflow
tracking server, and an S3 endpoint, all on 127.0.0.1.

One Ray instance, S3 endpoint and MLflow server serve the whole session (each costs seconds).
Every fixture here that starts a process (Ray, `mlflow server`, `ray start` nodes) is for tests
marked slow; tests/tiers.py checks that (the moto endpoint is a thread: fast tests may use it).
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.tiers"]  # the fast and slow tiers, checked

# No telemetry from tests: every Ray and MLflow process the tests start (local Ray, `ray start`
# nodes, `mlflow server`, subprocesses of `python -m ...`) inherits these from this process.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


def pytest_terminal_summary(terminalreporter):
    """The machine under the run, last: a CI log's minutes and numerical tolerances depend on it."""
    import torch

    from dcgan_dist.bench.machine import describe_machine

    terminalreporter.write_line(f"machine: {os.cpu_count()} cores, {describe_machine(torch.device('cpu'))}")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with as many CPUs as CI has (2).

    The dashboard stays on: Ray Train's placement-group cleaner asks its State API whether a
    trial's controller died, and without it the resources of a trial ASHA stops are never freed.
    """
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


def start_local_ray() -> None:
    """The session's local Ray instance (also restarted by tests that need Ray to themselves)."""
    import ray

    # address="local": never join a cluster some other process started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store (the registry needs a database) in a scratch directory."""
    monkeypatch.chdir(tmp_path)  # mlruns/ artifacts land here, not in the checkout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def train_args(tmp_path, tracking_uri: str, **overrides) -> list[str]:
    """argv for a small, fast training run into tmp_path."""
    options = {
        "max-steps": 12, "batch-size": 32, "log-every": 4, "sample-every": 6, "checkpoint-every": 6,
        "tracking-uri": tracking_uri, "storage-path": str(tmp_path / "ray_results"), "run-name": "test",
        "experiment": "tests", "eval-samples": 200,  # each run scores G at its last step: keep it cheap
    } | {key.replace("_", "-"): value for key, value in overrides.items()}
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint (moto's server) on 127.0.0.1, for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the loopback endpoint; boto3 finds it through the usual env vars."""
    import uuid

    import boto3

    from dcgan_dist.data import s3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3._clients.clear()  # clients made under other settings
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield bucket
    s3._clients.clear()


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1: sqlite backend in `folder`, artifacts proxied
    to s3://<bucket>/mlflow on the loopback S3 endpoint (clients need no S3 credentials)."""

    def __init__(self, folder, s3_endpoint: str, bucket: str, port: int | None = None):
        self.folder, self.s3_endpoint, self.bucket = folder, s3_endpoint, bucket
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        import subprocess
        import sys
        import time
        import urllib.request

        if self.process is not None and self.process.poll() is None:
            return self
        env = os.environ | {
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{self.bucket}/mlflow"],
            env=env, stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
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
        """Stop the server and every process it started (it runs in its own process group)."""
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def create_bucket(s3_endpoint: str) -> str:
    import uuid

    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """One real MLflow tracking server for the session (starting one takes seconds)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_endpoint, create_bucket(s3_endpoint)).start()
    yield server
    server.stop()


class RayCluster:
    """A real multi-node Ray cluster on 127.0.0.1 with token authentication: `ray start --head`
    and `ray start --address` nodes, each a `--block` process this fixture owns (stopping one
    stops exactly its node's processes, never another Ray on the machine)."""

    def __init__(self, root, cpus_per_node: int = 1):
        import secrets

        self.root, self.cpus_per_node = root, cpus_per_node
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Every node and every client needs the same token; it is never printed or logged.
        self.env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                                 "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.token = self.env["RAY_AUTH_TOKEN"]
        self.nodes = []

    def start_node(self, *args: str):
        import subprocess

        index = len(self.nodes)
        log = open(self.root / f"node{index}.log", "w")
        self.nodes.append(subprocess.Popen(
            ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus_per_node),
             "--temp-dir", str(self.root / f"node{index}"), *args,
             # Free ports, not Ray's defaults: other Ray instances may run on this machine.
             *[item for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                                 "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
               for item in (flag, str(free_port()))]],
            env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def start(self, num_nodes: int = 2, timeout_s: float = 120) -> RayCluster:
        import time

        from dcgan_dist.config import ConfigError
        from dcgan_dist.train import check_ray_address

        self.start_node("--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()))
        deadline = time.monotonic() + timeout_s
        while True:  # the GCS answers its gRPC health check
            try:
                check_ray_address(self.address, timeout_s=2)
                break
            except ConfigError:
                assert time.monotonic() < deadline and self.nodes[0].poll() is None, (self.root / "node0.log").read_text()[-3000:]
                time.sleep(1)
        for _ in range(num_nodes - 1):
            self.start_node("--address", self.address)
        while len(self.alive_nodes()) < num_nodes:
            assert time.monotonic() < deadline, (self.root / "node1.log").read_text()[-3000:]
            time.sleep(1)
        while True:  # the head's job agent takes jobs ("No available agent" until then)
            try:
                self.cli("job", "submit", "--address", self.dashboard, "--", "true")
                return self
            except AssertionError:
                assert time.monotonic() < deadline, "the job agent never came up"
                time.sleep(2)

    def cli(self, *args: str, timeout_s: float = 60) -> str:
        """`ray ...` against this cluster (the token travels in the environment)."""
        import subprocess

        result = subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    def list(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API (`ray list`), as JSON."""
        import json

        args = [item for f in filters for item in ("--filter", f)]
        try:
            return json.loads(self.cli("list", kind, "--address", self.dashboard, "--format", "json", *args))
        except (AssertionError, json.JSONDecodeError):  # the dashboard is still starting
            return []

    def alive_nodes(self) -> list[dict]:
        return self.list("nodes", "state=ALIVE")

    def stop(self) -> None:
        """SIGTERM to each node's `ray start --block` (it stops that node's processes), then
        SIGKILL to what is left of each node's process group."""
        import signal
        import subprocess

        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two Ray nodes (1 CPU each) on 127.0.0.1 with RAY_AUTH_MODE=token, for a test module.
    Their temp dirs live under RAY_TMPDIR when it is set (kept short: Ray's socket paths)."""
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=os.environ.get("RAY_TMPDIR") or None))
    cluster = RayCluster(root)
    try:
        yield cluster.start(num_nodes=2)
    finally:
        cluster.stop()
