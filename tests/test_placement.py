"""Where workers fit (dcgan_dist/placement.py) and how a sweep sizes itself from it
(tuning/run.py's plan_resources): pure functions of per-node resource lists, no Ray."""

from __future__ import annotations

import os

import pytest

from dcgan_dist import config, placement
from dcgan_dist.config import ClusterConfig, ConfigError
from tuning import run, sweep

HEAD = "node:__internal_head__"


def head(cpus: float, **resources) -> dict[str, float]:
    return {"CPU": cpus, HEAD: 1.0, "memory": 8e9} | resources


def node(cpus: float, **resources) -> dict[str, float]:
    return {"CPU": cpus, "memory": 32e9} | resources


def cluster(**fields) -> ClusterConfig:
    return ClusterConfig(**fields)


@pytest.mark.parametrize("nodes, num_workers, expected", [
    ([head(2)], 1, 2),  # a single machine: all its CPUs
    ([head(2)], 2, 1),
    ([head(1), node(2)], 1, 2),  # the head's CPU is not a worker's: 3 would fit nowhere
    ([head(0), node(2)], 1, 2),  # a head started with --num-cpus 0
    ([head(4), node(2), node(2)], 2, 2),  # 8 CPUs in all, but no two nodes hold 4 each
    ([head(4), node(2), node(2)], 3, 2),  # two on the head, one on a worker node
    ([head(4), node(3), node(3)], 3, 3),
    ([head(0), node(2)], 3, 0),  # three workers never fit on 2 CPUs
    ([], 1, 0),
])
def test_the_largest_cpus_per_worker_packs_workers_onto_nodes(nodes, num_workers, expected):
    assert placement.largest_cpus_per_worker(nodes, cluster(), num_workers) == expected


def test_with_gpus_only_gpu_nodes_count_and_a_worker_gets_its_gpus_share():
    gpu_nodes = [head(4), node(8, GPU=1.0), node(8, GPU=1.0)]
    assert placement.largest_cpus_per_worker(gpu_nodes, cluster(use_gpu=True), 2) == 8
    assert placement.largest_cpus_per_worker(gpu_nodes, cluster(use_gpu=True), 3) == 0  # two GPUs
    # a 2-GPU node's 16 CPUs are 8 per GPU, even for a single worker
    assert placement.largest_cpus_per_worker([head(4), node(16, GPU=2.0)], cluster(use_gpu=True), 1) == 8
    assert placement.largest_cpus_per_worker([head(4)], cluster(use_gpu=True), 1) == 0


def test_worker_resources_keep_workers_to_the_nodes_that_have_them():
    slotted = cluster(worker_resources='{"trainer_slot": 1}')
    assert placement.worker_request(slotted, 3) == {"CPU": 3, "trainer_slot": 1.0}
    nodes = [head(8), node(2, trainer_slot=1.0), node(4, trainer_slot=2.0)]
    assert placement.largest_cpus_per_worker(nodes, slotted, 1) == 4
    assert placement.largest_cpus_per_worker(nodes, slotted, 3) == 2
    assert placement.largest_cpus_per_worker(nodes, slotted, 4) == 0  # three slots in all
    assert placement.largest_cpus_per_worker([head(8)], slotted, 1) == 0


def test_cpus_per_worker_keeps_a_given_value_and_falls_back_to_one():
    assert placement.cpus_per_worker(cluster(cpus_per_worker=6), [head(2)]) == 6
    assert placement.cpus_per_worker(cluster(num_workers=4), [head(0), node(2)]) == 1


def test_the_cluster_at_its_largest_is_the_head_plus_every_group_at_its_maximum():
    alive = [head(4), node(8, GPU=1.0)]  # one GPU node is up already: it is one of the group's 4
    groups = [{"resources": {"CPU": 4}, "max_count": 1},  # the head's own group
              {"resources": {"CPU": 8, "GPU": 1}, "max_count": 4},
              {"resources": {"CPU": 2}, "max_count": 0}]
    nodes = placement.nodes_at_most(alive, groups)
    assert nodes == [head(4)] + [{"CPU": 8.0, "GPU": 1.0}] * 4
    unlimited = placement.nodes_at_most(alive, [{"resources": {"CPU": 2}, "max_count": -1}])
    assert len(unlimited) == 1 + placement.UNLIMITED_NODES


@pytest.mark.parametrize("text, problem", [
    ("trainer_slot", "not JSON"),
    ("[1]", "JSON object"),
    ('{"CPU": 2}', "--cpus-per-worker"),
    ('{"GPU": 1}', "--use-gpu"),
    ('{"slot": 0}', "> 0"),
    ('{"slot": "one"}', "> 0"),
])
def test_bad_worker_resources_are_refused_naming_the_flag(text, problem):
    with pytest.raises(ConfigError, match="--worker-resources") as error:
        config.validate(config.Config(cluster=cluster(worker_resources=text)))
    assert problem in str(error.value)


# ---------------------------------------------------------------- a sweep's plan


def settings(*flags: str) -> sweep.Sweep:
    return sweep.parse_args(["--search", "lr=1e-4,2e-4", *flags])


# cluster/raycluster.yaml: a 4-CPU head and a GPU group of 0..4 pods with 8 CPUs and 1 GPU each
KUBERAY_AT_MOST = [head(4)] + [{"CPU": 8.0, "GPU": 1.0}] * 4
KUBERAY_NOW = [head(4)]  # before the autoscaler has added any GPU pod


def test_a_gpu_sweep_sizes_itself_from_the_cluster_at_its_largest():
    gpu = ("--gpus-per-trial", "1")
    assert run.plan_resources(settings(*gpu, "--cpus-per-worker", "6"), KUBERAY_AT_MOST, True) == (4, 6)
    # auto: all of a pod's CPUs but what a trial driver may take there
    assert run.plan_resources(settings(*gpu), KUBERAY_AT_MOST, True) == (4, 7)
    assert run.plan_resources(settings(*gpu, "--max-concurrent", "2"), KUBERAY_AT_MOST, True) == (2, 7)
    assert run.plan_resources(settings(*gpu, "--max-concurrent", "9"), KUBERAY_AT_MOST, True) == (4, 7)
    # two 2-GPU trials: two of them at once
    assert run.plan_resources(settings("--gpus-per-trial", "2", "--batch-size", "64"), KUBERAY_AT_MOST, True)[0] == 2


def test_with_no_gpu_up_and_the_maximum_unknown_a_gpu_sweep_still_starts():
    """The autoscaler adds GPU pods only for workers that ask for them: the sweep must not exit
    because none is up yet."""
    gpu = ("--gpus-per-trial", "1", "--cpus-per-worker", "6")
    assert run.plan_resources(settings(*gpu, "--max-concurrent", "4"), KUBERAY_NOW, False) == (4, 6)
    assert run.plan_resources(settings(*gpu), KUBERAY_NOW, False) == (1, 6)
    assert run.plan_resources(settings("--gpus-per-trial", "1"), KUBERAY_NOW, False) == (1, 1)


def test_a_trial_that_can_never_fit_is_refused_before_any_starts():
    with pytest.raises(RuntimeError, match="one trial needs 3 workers"):
        run.plan_resources(settings("--workers-per-trial", "3", "--batch-size", "48"), [head(0), node(2)], True)


def test_on_one_machine_trials_and_their_drivers_share_its_cpus():
    assert run.plan_resources(settings(), [head(2)], False) == (1, 1)  # 2 CPUs: one 1-CPU trial beside its driver
    assert run.plan_resources(settings(), [head(8)], False) == (7, 1)
    assert run.plan_resources(settings("--max-concurrent", "2"), [head(8)], False) == (2, 3)
    assert run.plan_resources(settings("--cpus-per-worker", "4"), [head(8)], False) == (1, 4)


def test_the_strict_metric_switch_is_set_only_inside_the_sweep():
    name = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(name)
    with run.environment({name: "1"}):
        assert os.environ[name] == "1"
    assert os.environ.get(name) == before
    with pytest.raises(KeyError), run.environment({name: "1"}):
        raise KeyError("a failing sweep")
    assert os.environ.get(name) == before
