"""Where Ray Train workers can go: the nodes of the cluster (as it is, or as large as its
autoscaler may make it) and how many workers of a given size fit on them.

The rules are pure functions of a list of per-node resource dicts (`{"CPU": 8, "GPU": 1, ...}`,
as `ray.nodes()` reports them), so `train.py` (one run) and `tuning/run.py` (a sweep) share them
and tests need no cluster. Only `cluster_nodes()` talks to Ray.
"""

from __future__ import annotations

from dcgan_dist import worker_flags
from dcgan_dist.config import ClusterConfig

UNLIMITED_NODES = 256  # a node group the autoscaler may grow without a limit counts as this many nodes
_EPSILON = 1e-9  # resource amounts are floats: 0.3 CPUs hold three 0.1-CPU requests, not two


def worker_request(cluster: ClusterConfig, cpus: float) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, a GPU with --use-gpu, --worker-resources."""
    return {"CPU": cpus} | ({"GPU": 1.0} if cluster.use_gpu else {}) | worker_flags.worker_resources(cluster.worker_resources)


def slots(node: dict[str, float], request: dict[str, float]) -> int:
    """How many copies of `request` fit on one node."""
    return min((int(node.get(name, 0.0) / amount + _EPSILON) for name, amount in request.items() if amount > 0), default=0)


def workers_that_fit(nodes: list[dict[str, float]], request: dict[str, float]) -> int:
    """Workers of this size that the nodes hold at once (a worker lives on one node: no sums
    across nodes). Workers of one size pack greedily without loss, so this is exact."""
    return sum(slots(node, request) for node in nodes)


def reserve_cpus(nodes: list[dict[str, float]], cpus: float) -> list[dict[str, float]]:
    """The nodes less `cpus` on every node that has CPUs: room kept for processes Ray may place
    on any of them (a sweep's trial drivers), so workers fit whichever node those land on."""
    return [node | {"CPU": max(0.0, node["CPU"] - cpus)} if node.get("CPU", 0) > 0 else node for node in nodes]


def largest_cpus_per_worker(nodes: list[dict[str, float]], cluster: ClusterConfig, num_workers: int) -> int:
    """The most whole CPUs per worker such that `num_workers` workers fit on the nodes at once;
    0 when not even 1-CPU workers fit. With --use-gpu a worker takes at most its GPU's share of
    its node's CPUs (a node with 2 GPUs and 16 CPUs offers 8 per worker)."""
    if cluster.use_gpu:
        nodes = [node | {"CPU": share_per_gpu(node) * node["GPU"]} for node in nodes if node.get("GPU", 0) >= 1]
    most = int(max((node.get("CPU", 0.0) for node in nodes), default=0.0) + _EPSILON)
    for cpus in range(most, 0, -1):
        # with --use-gpu, only nodes whose per-GPU share is this large: no worker takes another GPU's CPUs
        hosts = [node for node in nodes if not cluster.use_gpu or share_per_gpu(node) >= cpus]
        if workers_that_fit(hosts, worker_request(cluster, cpus)) >= num_workers:
            return cpus
    return 0


def share_per_gpu(node: dict[str, float]) -> int:
    return int(node.get("CPU", 0.0) / node["GPU"] + _EPSILON)


def cpus_per_worker(cluster: ClusterConfig, nodes: list[dict[str, float]], workers: int = 0) -> int:
    """--cpus-per-worker, or (0) the most each of `workers` workers (default: one run's) can
    have on these nodes; 1 when they do not fit (yet: an autoscaler may add nodes whose size is
    unknown here). Ray sets each worker's OMP_NUM_THREADS from its CPU request, so a 1-CPU worker
    trains on one thread. A sweep asks for its concurrent trials' workers together."""
    return cluster.cpus_per_worker or largest_cpus_per_worker(nodes, cluster, workers or worker_flags.worker_range(cluster.num_workers)[1]) or 1


# ---------------------------------------------------------------- reading the cluster


def nodes_at_most(alive: list[dict[str, float]], node_groups: list[dict]) -> list[dict[str, float]]:
    """The cluster at its largest: the head as it is, plus max_count nodes of every node group
    the autoscaler manages (`{"resources": {...}, "max_count": N}`, -1 = no limit). A group that
    only describes the head (one node of the head's shape) is the head itself."""
    head = [node for node in alive if "node:__internal_head__" in node]
    nodes = [dict(node) for node in head]
    for group in node_groups:
        resources = {name: float(amount) for name, amount in group["resources"].items()}
        count = UNLIMITED_NODES if group["max_count"] < 0 else group["max_count"]
        if count == 0 or not resources:
            continue
        if count == 1 and head and all(head[0].get(name, 0.0) == amount for name, amount in resources.items()):
            continue
        nodes += [dict(resources) for _ in range(count)]
    return nodes


def cluster_nodes() -> tuple[list[dict[str, float]], bool]:
    """(per-node resources, at_most): the cluster at the largest size its autoscaler may reach
    (at_most = True), or, where no autoscaler has published its node groups to Ray's GCS, the
    alive nodes (at_most = False: more may come). Ray must be initialised.

    The node groups are what Ray's own code reads for the same question (Ray Train's check that
    a worker group can ever fit, Ray Data's autoscaler): the GCS's cluster config. Autoscalers
    that do not publish it leave the maximum unknown."""
    import ray
    import ray._private.state

    alive = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    read_config = getattr(ray._private.state.state, "get_cluster_config", None)  # absent from older Rays
    cluster_config = read_config() if read_config else None
    groups = [{"resources": dict(group.resources), "max_count": group.max_count}
              for group in (cluster_config.node_group_configs if cluster_config else [])]
    if not groups:
        return alive, False
    return nodes_at_most(alive, groups), True
