"""An autoscaling Ray cluster on 127.0.0.1: a head with 1 CPU whose autoscaler (Ray's fake
multi-node provider: each node is a set of processes on this machine) adds up to one `trainer`
node of 2 CPUs and a `trainer_slot` when work asks for one. A sweep whose trials need that node
starts before it exists and finishes on it; a run's automatic CPUs count only where its worker
can go.

Ray allows one Ray instance per process and this cluster is a second one on the machine, so its
module fixture shuts the session's `ray_local` down first (if an earlier module started it) and
starts it again at the end: tests after it find it as before. Ray's own AutoscalingCluster is not
used: it runs `ray stop --force`, which kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dcgan_dist import train
from tests.conftest import RayCluster, free_port, start_local_ray, train_args
from tests.test_sweep import runs_by_kind, sweep_args
from tuning import sweep

pytestmark = pytest.mark.slow

TRAINER = {"CPU": 2, "trainer_slot": 1}
SLOTTED = ["--worker-resources", json.dumps({"trainer_slot": 1})]


class AutoscalingRayCluster(RayCluster):
    """The head of RayCluster (free ports, its own process group, which the autoscaler's nodes
    join, so stop() ends them too) with an autoscaling config; no token, so this test process
    can be a driver (explicitly: with RAY_AUTH_MODE unset, `ray start` turns token auth on
    whenever a ~/.ray/auth_token exists, and this process would not send it)."""

    def __init__(self, root: Path):
        super().__init__(root, cpus_per_node=1)
        self.env.pop("RAY_AUTH_TOKEN")
        self.env |= {"RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.node_types = {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "trainer": {"resources": TRAINER, "node_config": {}, "min_workers": 0, "max_workers": 1},
        }

    def start(self, timeout_s: float = 120) -> AutoscalingRayCluster:
        from dcgan_dist.config import ConfigError

        autoscaling = {
            "cluster_name": "autoscale-test", "max_workers": 1, "head_node_type": "ray.head.default",
            "available_node_types": self.node_types, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        (self.root / "autoscaling.json").write_text(json.dumps(autoscaling))
        self.start_node("--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                        f"--autoscaling-config={self.root / 'autoscaling.json'}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                train.check_ray_address(self.address, timeout_s=2)
                return self
            except ConfigError:
                assert time.monotonic() < deadline and self.nodes[0].poll() is None, (self.root / "node0.log").read_text()[-3000:]
                time.sleep(1)

    def publish_node_groups(self) -> None:
        """Publish the node groups to the GCS as autoscalers that do so publish them (Ray 2.60's
        do not: then the maximum is unknown); Ray Train reads the same record."""
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2

        published = autoscaler_pb2.ClusterConfig()
        for name, node_type in self.node_types.items():
            group = published.node_group_configs.add(name=name, max_count=node_type["max_workers"])
            group.resources.update(node_type["resources"])
        GcsClient(address=self.address).report_cluster_config(published.SerializeToString())


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    session_ray_was_up = ray.is_initialized()
    ray.shutdown()
    cluster = AutoscalingRayCluster(Path(tempfile.mkdtemp(prefix="autoscale-")))
    try:
        yield cluster.start()
    finally:
        ray.shutdown()  # the drivers of the tests joined this cluster
        cluster.stop()
        if session_ray_was_up:
            start_local_ray()


def head_node_id() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])


def test_a_sweep_whose_trials_need_a_node_that_is_not_up_scales_up_and_finishes(autoscaling_cluster, mlflow_sqlite, tmp_path):
    """No trainer node is up and the maximum is unknown (Ray 2.60's autoscaler publishes no node
    groups): the sweep starts anyway, its trials queue, and the autoscaler adds the node."""
    started = time.monotonic()
    args = sweep_args(tmp_path, mlflow_sqlite, "lr=2e-4,1e-3", max_steps=4, checkpoint_every=4, eval_every=0) + [
        "--scheduler", "none", "--ray-address", autoscaling_cluster.address, *SLOTTED]
    assert sweep.main(args) == 0
    print(f"sweep of 2 trials on the autoscaled node: {time.monotonic() - started:.0f} s")

    _, children = runs_by_kind(MlflowClient(mlflow_sqlite))
    assert len(children) == 2 and all(child.info.status == "FINISHED" for child in children)
    for child in children:  # on the added node, never on the head
        assert head_node_id() not in json.loads(child.data.tags["ray.node_of_rank"])
        assert child.data.params["cluster.worker_resources"] == SLOTTED[1]


def test_automatic_cpus_per_worker_count_only_nodes_a_worker_can_use(autoscaling_cluster, mlflow_sqlite, tmp_path):
    """The cluster at its largest (its node groups published) has 3 CPUs, but no node has more
    than 2: the run's one worker asks for 2 (it would ask for 3, and wait forever, if the head's
    CPU counted) and runs on the trainer node (still up from the sweep, or added again)."""
    autoscaling_cluster.publish_node_groups()
    args = train_args(tmp_path, mlflow_sqlite, max_steps=4, log_every=2, checkpoint_every=4, sample_every=4, eval_every=0,
                      ray_address=autoscaling_cluster.address) + ["--no-register-models"]
    assert train.main(args) == 0
    run = MlflowClient(mlflow_sqlite).search_runs([MlflowClient(mlflow_sqlite).get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["cluster.cpus_per_worker"] == "2"
    assert head_node_id() not in json.loads(run.data.tags["ray.node_of_rank"])
