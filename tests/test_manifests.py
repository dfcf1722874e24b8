"""cluster/ and infra/: the KubeRay manifests, the MLflow stack, and the steps in docs/cluster.md that use them.

Offline and fast: every YAML parses; RayCluster/RayJob validate against the vendored KubeRay CRD
schemas (cluster/schemas/, with unknown fields rejected), the core Kubernetes objects and every
Ray pod template against Kubernetes' own schemas (kubernetes-validate bundles them); the RayJob
entrypoints parse with our CLI parsers; the spot and on-demand GPU groups hold the training RayJob's
elastic range and outlast their drain; no credential is written anywhere; the compose stack
and the ConfigMap are wired with the variables the code (and the libraries it calls) reads; and
the deploy is locked down: MLflow's basic-auth app with its admin from a Secret, the Ray pods
logging in with a Secret's user, a NetworkPolicy per service behind a default deny, every
container non-root with a read-only root filesystem (tests/test_tracking_auth.py runs the auth for real).
One test is slow: whether git ignores infra/.env is asked of git, a process.
"""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dcgan_dist import config, worker_flags

ROOT = Path(__file__).resolve().parents[1]
CLUSTER, INFRA = ROOT / "cluster", ROOT / "infra"
SCHEMAS = CLUSTER / "schemas"
COMPOSE = INFRA / "docker-compose.yaml"
LAUNCHER = CLUSTER / "ray-cluster-launcher.yaml"
README = ROOT / "README.md"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"  # the steps from an empty Kubernetes cluster to a run
K8S_VERSION = "1.31"  # oldest Kubernetes the manifests are meant for; its schemas are bundled
MIN_RAY_FOR_TOKEN_AUTH = (2, 52)

SENSITIVE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
# Variables our code reads through the libraries it calls (not through os.environ itself):
LIBRARY_ENV = {
    "boto3": {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"},
    "mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_DISABLE_TELEMETRY",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",  # the client's basic auth
               # the server's basic-auth app: its config file, first admin, CSRF key
               "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"},
    "ray": {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"},
}


# ---------------------------------------------------------------- loading


def yaml_files() -> list[Path]:
    return sorted(p for folder in (CLUSTER, INFRA) for p in folder.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[tuple[str, dict]]:
    """(file, object) for every Kubernetes object in cluster/ and infra/."""
    return [
        (str(path.relative_to(ROOT)), doc)
        for path in yaml_files()
        if path not in (COMPOSE, LAUNCHER)
        for doc in load_docs(path)
    ]


def the_object(kind: str, name: str) -> dict:
    (found,) = [doc for _, doc in k8s_objects() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def ray_objects() -> list[tuple[str, dict]]:
    return [(f, doc) for f, doc in k8s_objects() if doc["apiVersion"].startswith("ray.io/")]


def core_objects() -> list[tuple[str, dict]]:
    return [(f, doc) for f, doc in k8s_objects() if not doc["apiVersion"].startswith("ray.io/")]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


# The pod templates of each KubeRay object, by where they sit. The checks below loop over them and
# would pass over none, so pod_templates() fails where an object's are not these.
EXPECTED_POD_TEMPLATES = {
    "RayCluster/dcgan": ["head", "worker group gpu-spot", "worker group gpu-on-demand"],
    # the same cluster, created per job
    "RayJob/dcgan-train": ["submitter", "head", "worker group gpu-spot", "worker group gpu-on-demand"],
    "RayJob/dcgan-sweep": ["submitter"],  # runs on the RayCluster (clusterSelector)
}


def pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template in a RayCluster or RayJob, by where it sits: exactly the expected ones."""
    templates = {}
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc["spec"]:
        spec = cluster_spec(doc)
        templates["head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            templates[f"worker group {group['groupName']}"] = group["template"]
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    assert sorted(templates) == sorted(EXPECTED_POD_TEMPLATES.get(name, [])), f"{name}: pod templates {sorted(templates)}"
    return templates


def env_lists(node, where: str = ""):
    """(where, env list) for every `env:` list of containers in any object."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield where, value
            else:
                yield from env_lists(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from env_lists(item, f"{where}[{i}]")


def entrypoint_argv(doc: dict) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def dockerfile_arg(name: str, path: Path = CLUSTER / "Dockerfile") -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", path.read_text(), re.MULTILINE)
    return value


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# ---------------------------------------------------------------- everything parses


EXPECTED_FILES = [
    "cluster/Dockerfile", "cluster/raycluster.yaml", "cluster/rayjob-train.yaml", "cluster/rayjob-sweep.yaml",
    "cluster/ray-cluster-launcher.yaml", "infra/docker-compose.yaml", "infra/.env.example",
    "infra/mlflow/Dockerfile", "infra/k8s/mlflow.yaml", "infra/k8s/postgres.yaml", "infra/k8s/dcgan-env.yaml",
    "infra/k8s/networkpolicies.yaml", "infra/mlflow/basic_auth.ini", "infra/mlflow/create_user.py",
]


def test_expected_files_exist_and_every_yaml_parses():
    for name in EXPECTED_FILES:
        assert (ROOT / name).is_file(), name
    files = yaml_files()
    assert len(files) >= 8
    for path in files:
        docs = load_docs(path)  # raises on a YAML error
        assert docs and all(isinstance(doc, dict) for doc in docs), path
    for name, doc in k8s_objects():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), name
        assert "namespace" not in doc["metadata"], f"{name}: docs/cluster.md picks the namespace"


def test_no_vendored_or_committed_file_is_huge():
    for folder in (CLUSTER, INFRA):
        for path in folder.rglob("*"):
            assert not path.is_file() or path.stat().st_size < 5 * 2**20, path


# ---------------------------------------------------------------- KubeRay objects vs the CRD schemas


def strict(schema):
    """The CRD schema with unknown fields rejected, as the API server would prune (and silently
    drop) them: a misspelt field would otherwise validate and then do nothing."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


_VALIDATORS: dict[str, jsonschema.Validator] = {}


def crd_validator(kind: str) -> jsonschema.Validator:
    if kind not in _VALIDATORS:
        schema = json.loads((SCHEMAS / f"{kind.lower()}-ray.io-v1.json").read_text())
        _VALIDATORS[kind] = jsonschema.Draft7Validator(strict(schema))
    return _VALIDATORS[kind]


def crd_errors(doc: dict) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_vendored_schemas_name_their_source():
    source = (SCHEMAS / "SOURCE").read_text()
    assert re.search(r"\b[0-9a-f]{40}\b", source) and "ray-project/kuberay" in source


def test_kuberay_objects_validate_against_the_crd_schemas():
    kinds = sorted(doc["kind"] for _, doc in ray_objects())
    assert kinds == ["RayCluster", "RayJob", "RayJob"]
    for name, doc in ray_objects():
        assert doc["apiVersion"] == "ray.io/v1", name
        assert crd_errors(doc) == [], name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name


def test_the_crd_check_rejects_a_misspelt_field_and_a_bad_quantity():
    raycluster = the_object("RayCluster", "dcgan")
    misspelt = copy.deepcopy(raycluster)
    misspelt["spec"]["workerGroupSpecs"][0]["rayStartParam"] = misspelt["spec"]["workerGroupSpecs"][0].pop("rayStartParams")
    assert any("rayStartParam" in error for error in crd_errors(misspelt))
    bad_gpu = copy.deepcopy(raycluster)
    bad_gpu["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "one"
    assert crd_errors(bad_gpu)


def test_every_kuberay_object_has_its_pod_templates():
    found = {f"{doc['kind']}/{doc['metadata']['name']}": sorted(pod_templates(doc)) for _, doc in ray_objects()}
    assert found == {name: sorted(where) for name, where in EXPECTED_POD_TEMPLATES.items()}


def test_ray_pod_templates_validate_as_kubernetes_pod_templates():
    """The CRD schema leaves a template's metadata open; Kubernetes' PodTemplate schema does not."""
    for _, doc in ray_objects():
        for template in pod_templates(doc).values():
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- core objects vs Kubernetes' schemas


def test_core_objects_validate_against_the_kubernetes_schemas():
    kinds = {doc["kind"] for _, doc in core_objects()}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Job", "NetworkPolicy"} <= kinds
    for name, doc in core_objects():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_the_kubernetes_check_rejects_a_misspelt_field():
    deployment = copy.deepcopy(the_object("Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/health", "port": 5000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_every_deployment_has_a_readiness_probe_and_a_service():
    services = {doc["metadata"]["name"]: doc for _, doc in core_objects() if doc["kind"] == "Service"}
    for _, doc in core_objects():
        if doc["kind"] != "Deployment":
            continue
        name = doc["metadata"]["name"]
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container, name
        assert services[name]["spec"]["selector"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()


# ---------------------------------------------------------------- the Ray cluster


def test_raycluster_has_a_head_and_autoscaled_gpu_groups_with_shared_memory():
    spec = the_object("RayCluster", "dcgan")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert gpu_groups(the_object("RayCluster", "dcgan")) == groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
    assert sum(group["maxReplicas"] for group in groups) >= 2
    for template in (spec["headGroupSpec"]["template"], *(group["template"] for group in groups)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in template["spec"]["containers"]:
            (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_ray_version_matches_the_image_and_supports_token_auth():
    image_ray = dockerfile_arg("RAY_VERSION")
    assert version_tuple(image_ray)[:2] >= MIN_RAY_FOR_TOKEN_AUTH
    for name, doc in ray_objects():
        if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc["spec"]:
            assert cluster_spec(doc)["rayVersion"] == image_ray, name


def test_the_training_rayjob_creates_the_same_cluster_as_raycluster_yaml():
    train = the_object("RayJob", "dcgan-train")
    assert train["spec"]["rayClusterSpec"] == the_object("RayCluster", "dcgan")["spec"]
    assert train["spec"]["shutdownAfterJobFinishes"] is True


def test_the_sweep_rayjob_targets_the_raycluster():
    sweep = the_object("RayJob", "dcgan-sweep")
    assert "rayClusterSpec" not in sweep["spec"]
    assert sweep["spec"]["clusterSelector"] == {"ray.io/cluster": the_object("RayCluster", "dcgan")["metadata"]["name"]}


def test_token_auth_is_on_for_every_ray_process():
    """Head, workers, the autoscaler and the job submitter: Ray refuses unauthenticated peers."""

    def assert_token_env(env: list[dict], where: str):
        by_name = {entry["name"]: entry for entry in env}
        assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth", "key": "auth_token"}, where

    for name, doc in ray_objects():
        for where, template in pod_templates(doc).items():
            for container in template["spec"]["containers"]:
                assert_token_env(container["env"], f"{name} {where}")
        if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc["spec"]:
            assert_token_env(cluster_spec(doc)["autoscalerOptions"]["env"], f"{name} autoscaler")
    launcher = LAUNCHER.read_text()
    for command in load_docs(LAUNCHER)[0]["head_start_ray_commands"] + load_docs(LAUNCHER)[0]["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command, command
    assert "--env-file" in launcher  # where RAY_AUTH_TOKEN comes from on plain VMs


def test_the_cluster_launcher_yaml_validates_against_rays_schema():
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # found, not imported
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    launcher = load_docs(LAUNCHER)[0]
    jsonschema.validate(launcher, schema)
    assert launcher["docker"]["image"] == the_object("RayCluster", "dcgan")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_images_are_pinned_and_ours_share_one_registry():
    images = [
        container["image"]
        for _, doc in k8s_objects()
        for template in (pod_templates(doc).values() if doc["apiVersion"].startswith("ray.io/") else [doc.get("spec", {}).get("template", {})])
        for container in template.get("spec", {}).get("containers", [])
    ]
    images += [service["image"] for service in load_docs(COMPOSE)[0]["services"].values() if "build" not in service]
    # the images ours are built on: FROM lines, with an ARG's default where FROM names one
    for dockerfile in (CLUSTER / "Dockerfile", INFRA / "mlflow" / "Dockerfile"):
        for base in re.findall(r"^FROM (\S+)", dockerfile.read_text(), re.MULTILINE):
            images.append(dockerfile_arg(base[2:-1], dockerfile) if base.startswith("${") else base)
    assert images
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    ours = {image.rsplit("/", 1)[0] for image in images if "dcgan" in image.rsplit("/", 1)[-1]}
    assert ours == {"registry.example.com"}  # one `sed` in docs/cluster.md retargets them all


def test_training_dockerfile_cuda_base_project_installed_non_root():
    text = (CLUSTER / "Dockerfile").read_text()
    assert dockerfile_arg("CUDA_IMAGE").startswith("nvidia/cuda:")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r'pip install .* "\.\[gpu\]"(\s|$)', text), "the project itself is installed, with its gpu extra"
    import tomllib

    extras = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "nvidia-ml-py" in extras["gpu"]  # pynvml: MLflow's system/gpu_* metrics
    assert "import dcgan_dist.train, ray, pynvml" in text
    for folder in ("dcgan_dist", "tuning"):
        assert re.search(rf"^COPY {folder} ", text, re.MULTILINE), folder
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "runs as a non-root user"
    mlflow_text = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert "psycopg2-binary" in mlflow_text and "boto3" in mlflow_text
    # no telemetry from the images' processes
    assert re.search(r"RAY_USAGE_STATS_ENABLED=0", text) and re.search(r"MLFLOW_DISABLE_TELEMETRY=true", text)
    assert "ENV MLFLOW_DISABLE_TELEMETRY=true" in mlflow_text
    assert re.findall(r"^USER (\S+)$", mlflow_text, re.MULTILINE)[-1] not in ("root", "0")


# ---------------------------------------------------------------- the locked-down deploy


def workload_pods() -> dict[str, dict]:
    """Every pod template of the manifests (Deployments, Jobs, Ray head/workers/submitters), by name."""
    pods = {}
    for _, doc in k8s_objects():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("ray.io/"):
            pods |= {f"{name} {where}": template for where, template in pod_templates(doc).items()}
        elif doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            pods[name] = doc["spec"]["template"]
    return pods


def test_every_container_runs_non_root_read_only_without_privileges():
    pods = workload_pods()
    assert sorted(pods) == sorted(["Deployment/minio", "Deployment/mlflow", "Deployment/postgres", "Job/create-buckets",
                                   "Job/create-mlflow-user"] + [f"{name} {where}" for name, places in EXPECTED_POD_TEMPLATES.items()
                                                                for where in places]), sorted(pods)
    for name, template in pods.items():
        spec = template["spec"]
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            assert_locked_down(container.get("securityContext", {}), f"{name} {container['name']}")
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: {mount['name']} is not a volume of the pod"
        # the head's autoscaler sidecar too, with /tmp writable from the head pod's volumes
        if name.endswith(" head"):
            for _, doc in ray_objects():
                if name.startswith(f"{doc['kind']}/{doc['metadata']['name']} ") and "autoscalerOptions" in cluster_spec(doc):
                    autoscaler = cluster_spec(doc)["autoscalerOptions"]
                    assert_locked_down(autoscaler["securityContext"], f"{name} autoscaler")
                    assert {m["name"] for m in autoscaler["volumeMounts"]} <= volumes.keys(), name
    # The Ray containers write /tmp (Ray's /tmp/ray) and the home folder: emptyDirs, not the image.
    for name, template in pods.items():
        if name.startswith(("RayCluster", "RayJob")) and not name.endswith("submitter"):
            volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
            (container,) = template["spec"]["containers"]
            writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert {"/tmp", "/home/ray"} <= writable.keys() and all("emptyDir" in v for v in writable.values()), name


def assert_locked_down(security: dict, where: str) -> None:
    assert security.get("allowPrivilegeEscalation") is False, where
    assert security.get("readOnlyRootFilesystem") is True, where
    assert security.get("capabilities") == {"drop": ["ALL"]}, where
    assert not security.get("privileged") and security.get("runAsUser", 1) != 0, where


def test_the_dockerfiles_make_and_use_a_non_root_user():
    for dockerfile in (CLUSTER / "Dockerfile", INFRA / "mlflow" / "Dockerfile"):
        text = dockerfile.read_text()
        (uid,) = re.findall(r"useradd .*--uid (\d+)", text)
        assert re.findall(r"^USER (\S+)$", text, re.MULTILINE)[-1] == uid != "0", dockerfile
    uids = {pod["spec"]["securityContext"]["runAsUser"] for name, pod in workload_pods().items() if "postgres" not in name and "minio" not in name}
    assert uids == {1000}  # the useradd uid of both images


def matches(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy podSelector (matchLabels only, which is all ours use) against pod labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def network_policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"] for _, doc in core_objects() if doc["kind"] == "NetworkPolicy"}


def allowed_from(policy: dict) -> list[tuple[dict, set[int] | None]]:
    """(peer, ports or None for every port) for each peer of each ingress rule."""
    return [
        (peer, {port["port"] for port in rule["ports"]} if "ports" in rule else None)
        for rule in policy.get("ingress", []) for peer in rule["from"]
    ]


def pods_allowed(policy: dict, port: int) -> set[str]:
    """The pods of the manifests an ingress policy lets in on `port` (by pod-selector peers)."""
    pods = workload_pods()
    return {
        name for name, template in pods.items()
        for peer, ports in allowed_from(policy)
        if "podSelector" in peer and (ports is None or port in ports) and matches(peer["podSelector"], template.get("metadata", {}).get("labels", {}))
    }


def test_ingress_is_denied_by_default():
    policies = network_policies()
    deny = [p for p in policies.values() if p["podSelector"] == {} and p["policyTypes"] == ["Ingress"] and not p.get("ingress")]
    assert len(deny) == 1, "one policy selects every pod and allows no ingress"
    for name, policy in policies.items():
        assert "Egress" not in policy["policyTypes"], f"{name}: egress stays open (an S3 outside the cluster); see networkpolicies.yaml"
        for peer, _ in allowed_from(policy):
            assert "ipBlock" not in peer, f"{name}: no address ranges, only pods and the operator's namespace"


def test_each_service_has_a_network_policy_that_lets_in_only_its_clients():
    policies = network_policies()
    pods = workload_pods()
    labels = {name: template.get("metadata", {}).get("labels", {}) for name, template in pods.items()}

    def policy_for(deployment: str) -> dict:
        (name,) = [n for n, p in policies.items() if p["podSelector"] and matches(p["podSelector"], labels[f"Deployment/{deployment}"])]
        return policies[name]

    ray_pods = {name for name in pods if name.startswith(("RayCluster", "RayJob")) and not name.endswith("submitter")}
    # Postgres: only MLflow, on its port.
    assert pods_allowed(policy_for("postgres"), 5432) == {"Deployment/mlflow"}
    assert all(ports == {5432} for _, ports in allowed_from(policy_for("postgres")))
    # MinIO: MLflow, the bucket Job and the Ray pods, on the S3 port only (the console by port-forward).
    assert pods_allowed(policy_for("minio"), 9000) == {"Deployment/mlflow", "Job/create-buckets"} | ray_pods
    assert all(ports == {9000} for _, ports in allowed_from(policy_for("minio")))
    # MLflow: the Ray pods (driver, rank 0) and the user Job.
    assert pods_allowed(policy_for("mlflow"), 5000) == {"Job/create-mlflow-user"} | ray_pods
    assert all(ports == {5000} for _, ports in allowed_from(policy_for("mlflow")))
    # No allow rule names a peer in another namespace, except the Ray policy's operator rule below.
    for name in ("postgres", "minio", "mlflow"):
        assert all(set(peer) == {"podSelector"} for peer, _ in allowed_from(policy_for(name))), name
    # Every Service's pods are selected by an allow policy.
    for _, doc in core_objects():
        if doc["kind"] == "Service":
            selector = {"matchLabels": doc["spec"]["selector"]}
            assert any(p["podSelector"] == selector for p in policies.values()), doc["metadata"]["name"]


def test_ray_ports_are_open_to_the_namespace_and_everything_else_only_between_ray_pods():
    policies = network_policies()
    pods = workload_pods()
    ray_pods = {name: t for name, t in pods.items() if name.startswith(("RayCluster", "RayJob")) and not name.endswith("submitter")}
    (name,) = [n for n, p in policies.items() if p["podSelector"] and all(matches(p["podSelector"], t["metadata"]["labels"]) for t in ray_pods.values())]
    policy = policies[name]
    assert not any(matches(policy["podSelector"], t.get("metadata", {}).get("labels", {})) for n, t in pods.items() if n not in ray_pods)
    head = the_object("RayCluster", "dcgan")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    public = {head_ports["gcs-server"], head_ports["dashboard"], head_ports["client"]}
    rules = allowed_from(policy)
    # every port, but only from Ray pods (nodes talk on many ports)
    (all_ports,) = [peer for peer, ports in rules if ports is None]
    assert all_ports == {"podSelector": policy["podSelector"]}
    # GCS, dashboard, client: from any pod of the namespace (an empty podSelector, no namespaceSelector)
    assert ({"podSelector": {}}, public) in rules
    # the KubeRay operator's namespace (docs/cluster.md installs it there) reaches only the dashboard
    operator = [ports for peer, ports in rules if "namespaceSelector" in peer]
    assert operator == [{head_ports["dashboard"]}]
    assert "--namespace kuberay-system" in CLUSTER_DOC.read_text()
    assert len(rules) == 3


def secret_env(container_env: list[dict]) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container_env if "secretKeyRef" in e.get("valueFrom", {})}


def auth_ini() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string((INFRA / "mlflow" / "basic_auth.ini").read_text())
    return parser["mlflow"]


def test_mlflow_runs_the_basic_auth_app_with_its_admin_from_a_secret_and_its_users_in_postgres():
    (server,) = the_object("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in server["command"]
    env = secret_env(server["env"])
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == ("mlflow-admin", "username")
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-admin", "password")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == ("mlflow-admin", "flask_secret_key")
    # The image reads the app's settings from its basic_auth.ini: no admin password there, the
    # users in the backend's Postgres (password from PGPASSWORD), the default authorisation.
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert re.search(r'pip install .*"mlflow\[auth\]==\$\{MLFLOW_VERSION\}"', dockerfile), "the auth extra (Flask-WTF)"
    (config_path,) = re.findall(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", dockerfile)
    assert re.search(rf"^COPY basic_auth.ini {re.escape(config_path)}$", dockerfile, re.MULTILINE)
    ini = auth_ini()
    assert "admin_password" not in ini and "admin_username" not in ini, "the admin comes from the Secret"
    auth_db = urlparse(ini["database_uri"])
    assert auth_db.scheme == "postgresql" and auth_db.password is None
    assert auth_db.hostname == backend_host(server["command"]) and auth_db.path == urlparse(
        [a for a in server["command"] if a.startswith("--backend-store-uri=")][0].split("=", 1)[1]).path
    assert ini["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert ini["default_permission"] in ("READ", "NO_PERMISSIONS")
    # The same in compose.
    compose = load_docs(COMPOSE)[0]["services"]
    assert "--app-name=basic-auth" in compose["mlflow"]["command"]
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(compose_environment(compose["mlflow"]))
    assert compose["create-mlflow-user"]["command"] == the_object("Job", "create-mlflow-user")["spec"]["template"]["spec"]["containers"][0]["command"]


def test_the_training_pods_log_in_with_the_user_the_job_creates():
    (job,) = the_object("Job", "create-mlflow-user")["spec"]["template"]["spec"]["containers"]
    job_env = secret_env(job["env"])
    user = {name: job_env[name] for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    assert user == {"MLFLOW_TRACKING_USERNAME": ("mlflow-train", "username"), "MLFLOW_TRACKING_PASSWORD": ("mlflow-train", "password")}
    assert job_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-admin", "password")
    assert job["command"] == ["python", "/opt/create_user.py"] and "create_user.py /opt/" in (INFRA / "mlflow" / "Dockerfile").read_text()
    for _, doc in ray_objects():
        if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc["spec"]:
            for where, template in pod_templates(doc).items():
                if where == "submitter":  # it only submits; the driver runs on the head
                    continue
                (container,) = template["spec"]["containers"]
                env = secret_env(container["env"])
                assert {name: env.get(name) for name in user} == user, f"{doc['metadata']['name']} {where}"
    train = compose_environment(load_docs(COMPOSE)[0]["services"]["train"])
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(train)


# ---------------------------------------------------------------- spot GPUs (docs/cluster.md#running-on-spot-gpus)

MARKET_TYPE = "ray.io/market-type"  # Ray's node label for it (ray._raylet.RAY_NODE_MARKET_TYPE_KEY)
CAPACITY_TYPE = "eks.amazonaws.com/capacityType"  # EKS managed node groups' node label
CAPACITY_OF_MARKET = {"spot": "SPOT", "on-demand": "ON_DEMAND"}
DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # how long `ray start --block` drains on SIGTERM
POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"  # how often Ray Train looks for draining nodes
# After the drain `ray start` stops the node's processes, about a second for each kind; the
# kubelet's SIGKILL must wait for that too.
TEARDOWN_S = 10
K8S_DEFAULT_GRACE_S = 30


def gpu_groups(doc: dict) -> list[dict]:
    """The worker groups of a RayCluster or RayJob whose pods ask for a GPU."""
    if doc["kind"] == "RayJob" and "rayClusterSpec" not in doc["spec"]:
        return []
    return [group for group in cluster_spec(doc).get("workerGroupSpecs", [])
            if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]]


def clusters() -> list[tuple[str, dict]]:
    """(name, object) for every KubeRay object that creates a cluster."""
    return [(f"{doc['kind']}/{doc['metadata']['name']}", doc) for _, doc in ray_objects()
            if doc["kind"] == "RayCluster" or "rayClusterSpec" in doc["spec"]]


def flag_value(argv: list[str], flag: str) -> str:
    (value,) = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == flag] + \
               [word.split("=", 1)[1] for word in argv if word.startswith(flag + "=")]
    return value


def worker_range(argv: list[str]) -> tuple[int, int]:
    """--num-workers N or MIN:MAX, as (min, max), read as the trainer reads it."""
    return worker_flags.worker_range(flag_value(argv, "--num-workers"))


def plain_env(container: dict) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container.get("env", []) if "value" in entry}


def test_the_elastic_range_is_the_gpu_groups_replicas_summed():
    """--num-workers MIN:MAX asks for what the groups hold at their smallest and largest: a larger MAX
    waits for workers that never come, a smaller one leaves GPUs idle; MIN is what no preemption takes."""
    train = the_object("RayJob", "dcgan-train")
    groups = gpu_groups(train)
    assert len(groups) >= 2
    for group in groups:  # one worker per pod
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and group.get("numOfHosts", 1) == 1, group["groupName"]
    argv = entrypoint_argv(train)
    replicas = (sum(group["minReplicas"] for group in groups), sum(group["maxReplicas"] for group in groups))
    assert worker_range(argv) == replicas, f"--num-workers {flag_value(argv, '--num-workers')}: the GPU groups hold {replicas}"
    assert 1 <= replicas[0] < replicas[1], "elastic, and never below one worker"
    assert int(flag_value(argv, "--max-failures")) > 0 and int(flag_value(argv, "--max-preemptions")) != 0
    # The sweep on the RayCluster runs one 1-GPU trial per pod, as many as the groups hold.
    sweep_at_once = int(flag_value(entrypoint_argv(the_object("RayJob", "dcgan-sweep")), "--max-concurrent"))
    assert sweep_at_once == sum(group["maxReplicas"] for group in gpu_groups(the_object("RayCluster", "dcgan")))


def test_every_gpu_pod_outlasts_its_drain():
    """SIGTERM drains a node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, the window in which every rank
    checkpoints; a kubelet SIGKILL at terminationGracePeriodSeconds must come after it and the teardown."""
    found = clusters()
    assert found
    for name, doc in found:
        drains = []
        for group in gpu_groups(doc):
            spec = group["template"]["spec"]
            (worker,) = spec["containers"]
            where = f"{name} {group['groupName']}"
            assert DRAIN_ENV in plain_env(worker), f"{where}: {DRAIN_ENV} is not set"
            drain = float(plain_env(worker)[DRAIN_ENV])
            grace = spec.get("terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_S)
            assert drain > 0, f"{where}: {DRAIN_ENV}={drain} turns the drain off"
            assert grace >= drain + TEARDOWN_S, f"{where}: terminationGracePeriodSeconds {grace} <= {drain} s of drain + {TEARDOWN_S}"
            drains.append(drain)
        # Ray Train reads the poll interval in its controller, from the driver's environment: the head's.
        (head,) = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"]
        poll = float(plain_env(head)[POLL_ENV])
        assert 0 < poll <= min(drains) / 5, f"{name}: {POLL_ENV}={poll} takes too much of a {min(drains)} s drain"


def test_the_gpu_groups_are_spot_first_with_an_on_demand_fallback():
    for name, doc in clusters():
        spec = cluster_spec(doc)
        market_of = {group["groupName"]: group.get("labels", {}).get(MARKET_TYPE) for group in gpu_groups(doc)}
        assert sorted(map(str, market_of.values())) == ["on-demand", "spot"], f"{name}: {market_of}"
        for group in gpu_groups(doc):
            market = market_of[group["groupName"]]
            # KubeRay >= 1.5 refuses rayStartParams' labels; the group's labels become `ray start --labels`.
            assert "labels" not in group["rayStartParams"], f"{name} {group['groupName']}"
            selector = group["template"]["spec"].get("nodeSelector", {})
            assert selector.get(CAPACITY_TYPE) == CAPACITY_OF_MARKET[market], f"{name} {group['groupName']}: pods of a {market} group on {selector}"
        # The head (GCS, driver, Ray Train's controller) survives every preemption.
        assert spec["headGroupSpec"]["template"]["spec"]["nodeSelector"] == {CAPACITY_TYPE: "ON_DEMAND"}, name
        # One on-demand GPU at least: the run's floor.
        assert sum(g["minReplicas"] for g in gpu_groups(doc) if market_of[g["groupName"]] == "on-demand") >= 1, name
        # The autoscaler adds spot pods first; KubeRay refuses a priority unless autoscaler v2 is asked
        # for by name, and Ray before 2.56 has none (validateWorkerGroupPriority).
        priority = {market: [g.get("priority", 0) for g in gpu_groups(doc) if market_of[g["groupName"]] == market]
                    for market in CAPACITY_OF_MARKET}
        assert min(priority["spot"]) > max(priority["on-demand"]), f"{name}: {priority}"
        assert spec["autoscalerOptions"].get("version") == "v2", name
        assert version_tuple(spec["rayVersion"]) >= (2, 56), name


# ---------------------------------------------------------------- the RayJob entrypoints


def test_the_training_rayjob_runs_the_real_module_and_its_flags_parse():
    train = the_object("RayJob", "dcgan-train")
    argv = entrypoint_argv(train)
    assert argv[:3] == ["python", "-m", "dcgan_dist.train"], argv
    try:
        cfg = config.parse(argv[3:])
    except SystemExit as e:
        pytest.fail(f"cluster/rayjob-train.yaml: dcgan_dist.train rejects its flags (exit {e.code}): {argv[3:]}")
    assert cfg.cluster.use_gpu and cfg.model.preset == "paper" and cfg.model.image_size == 64
    assert cfg.data.data == "digits"
    assert cfg.tracking.storage_path.startswith("s3://"), "multi-node checkpoints need shared storage"
    assert cfg.cluster.max_failures > 0, "a lost worker pod should restart the run from its checkpoint"
    assert cfg.tracking.tracking_uri == the_object("ConfigMap", "dcgan-env")["data"]["MLFLOW_TRACKING_URI"]
    # It fits the cluster it creates: CPUs within every GPU pod (the worker count: the elastic-range test).
    for group in gpu_groups(train):
        (worker,) = group["template"]["spec"]["containers"]
        assert 0 < cfg.cluster.cpus_per_worker <= int(worker["resources"]["limits"]["cpu"]), group["groupName"]


def test_the_sweep_rayjob_runs_the_real_module_and_its_flags_parse():
    """The sweep RayJob runs this checkout's `python -m tuning.sweep` (tuning/sweep.py, the CLI)
    with flags its parser accepts."""
    argv = entrypoint_argv(the_object("RayJob", "dcgan-sweep"))
    assert argv[:3] == ["python", "-m", "tuning.sweep"], argv
    from tuning import sweep

    if Path(sweep.__file__).resolve().parent != ROOT / "tuning":
        pytest.fail(f"tuning.sweep was imported from {sweep.__file__}, not from this checkout ({ROOT}): "
                    "an editable install of another checkout")
    try:
        settings = sweep.parse_args(argv[3:])
    except SystemExit as e:
        pytest.fail(f"cluster/rayjob-sweep.yaml: tuning.sweep rejects its flags (exit {e.code}): {argv[3:]}")
    assert settings is not None


# ---------------------------------------------------------------- no plaintext secret anywhere


def literal_credentials_in_k8s(doc: dict) -> list[str]:
    """Env entries with a credential-like name that do not come from a Secret, Secret objects
    with their data in the file, and ConfigMap keys that look like credentials."""
    problems = []
    for where, env in env_lists(doc):
        for entry in env:
            if SENSITIVE_NAME.search(entry["name"]) and ("value" in entry or "secretKeyRef" not in entry.get("valueFrom", {})):
                problems.append(f"{where}: {entry['name']} is not from a secretKeyRef")
    if doc.get("kind") == "Secret":
        problems.append(f"Secret {doc['metadata']['name']} is in a file; create it with kubectl instead")
    if doc.get("kind") == "ConfigMap":
        problems += [f"ConfigMap key {key} looks like a credential" for key in doc.get("data", {}) if SENSITIVE_NAME.search(key)]
    return problems


SUBSTITUTION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(:?[?-][^}]*)?\}")


def literal_credentials_in_compose(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
        for key, value in environment.items():
            if SENSITIVE_NAME.search(key) and not (isinstance(value, str) and SUBSTITUTION.fullmatch(value)):
                problems.append(f"{name}: {key} is not a ${{VAR}} substitution")
    return problems


CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # scheme://user:password@host, unless the password is a placeholder or a variable
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:(?![<$])[^\s/@]+@"),
    # kubectl create secret ... --from-literal=NAME=value, unless value is <placeholder> or $VAR
    "literal Secret value": re.compile(r"--from-literal=?\s*[A-Za-z_]*(?:PASSWORD|SECRET|TOKEN|KEY|password|token)[A-Za-z_]*=(?![<$'\"]*[<$])\S+"),
    "assigned credential": re.compile(r"\b[A-Z_]*(?:PASSWORD|SECRET_ACCESS_KEY|AUTH_TOKEN)\s*=\s*(?!change-me\b)(?![<$])[A-Za-z0-9/+]{8,}"),
}


def credential_patterns(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def scanned_files() -> list[Path]:
    files = [p for folder in (CLUSTER, INFRA) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [*files, README, CLUSTER_DOC]


def test_secret_scanners_catch_literals():
    """The checks below can fail: each is shown a credential written in the clear."""
    assert literal_credentials_in_k8s({"kind": "Pod", "spec": {"containers": [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}]}})
    from_config_map = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
    assert literal_credentials_in_k8s({"kind": "Pod", "spec": {"containers": [{"env": [from_config_map]}]}})
    assert literal_credentials_in_k8s({"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "b"}})
    assert literal_credentials_in_compose({"services": {"db": {"environment": {"POSTGRES_PASSWORD": "hunter22"}}}})
    assert literal_credentials_in_compose({"services": {"db": {"environment": ["POSTGRES_PASSWORD=hunter22"]}}})
    assert not literal_credentials_in_compose({"services": {"db": {"environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}"}}}})
    for leak in (
        "aws_access_key_id = AKIA" + "ABCDEFGHIJKLMNOP",
        "postgresql://mlflow:" + "hunter22@postgres:5432/mlflow",
        "kubectl create secret generic ray-auth --from-literal=auth_token=" + "s3cr3t-value",
        "POSTGRES_PASSWORD=" + "hunter2hunter2",
    ):
        assert credential_patterns(leak), leak
    for fine in ("postgresql://mlflow@postgres:5432/mlflow", "--from-literal=auth_token=<a long random string>",
                 "--from-literal=auth_token=\"$(openssl rand -hex 32)\"", "POSTGRES_PASSWORD=change-me"):
        assert not credential_patterns(fine), fine


def test_no_literal_credential_in_any_kubernetes_object():
    for name, doc in k8s_objects():
        assert literal_credentials_in_k8s(doc) == [], name


def test_no_literal_credential_in_the_compose_file_and_env_example_holds_placeholders():
    assert literal_credentials_in_compose(load_docs(COMPOSE)[0]) == []
    used = set(SUBSTITUTION.findall(COMPOSE.read_text()))
    used = {name for name, _ in used}
    example = dict(
        line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines() if line and not line.startswith("#")
    )
    assert used == set(example), "every ${VAR} of the compose file is in .env.example, and nothing else"
    assert set(example.values()) == {"change-me"}


@pytest.mark.slow
def test_the_compose_env_file_is_git_ignored():
    """Asked of git itself (a process), so in the slow tier."""
    ignored = subprocess.run(["git", "check-ignore", "-q", str(INFRA / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"


def test_no_credential_pattern_in_any_file_of_cluster_infra_or_the_readme():
    for path in scanned_files():
        assert credential_patterns(path.read_text(errors="replace")) == [], path


def test_every_secret_the_manifests_use_is_created_by_the_readme():
    """docs/cluster.md's `kubectl create secret` lines create exactly the Secrets and keys referenced."""
    referenced: set[tuple[str, str | None]] = set()

    def collect(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                referenced.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secretRef" in node:
                referenced.add((node["secretRef"]["name"], None))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    for _, doc in k8s_objects():
        collect(doc)
    created: dict[str, set[str]] = {}
    for command in readme_commands(run_on_a_cluster_section()):
        if command.startswith("kubectl create secret generic"):
            words = shlex.split(command, comments=True)
            keys = {w.split("=", 1)[1].split("=", 1)[0] for w in words if w.startswith("--from-literal=")}
            created[words[4]] = keys
    assert referenced
    for secret, key in referenced:
        assert secret in created, f"docs/cluster.md never creates Secret {secret}"
        assert key is None or key in created[secret], f"docs/cluster.md's Secret {secret} lacks key {key}"
    # envFrom a Secret hands over its keys as variables: those must be names the code reads.
    for secret in {secret for secret, key in referenced if key is None}:
        assert created[secret] <= env_names_the_code_reads(), secret


# ---------------------------------------------------------------- variables the code reads


def env_names_read_by_our_code() -> set[str]:
    pattern = re.compile(r"""os\.(?:environ\.get|environ\.setdefault|getenv)\(\s*["']([A-Z0-9_]+)["']|os\.environ\[\s*["']([A-Z0-9_]+)["']""")
    names = set()
    for folder in ("dcgan_dist", "tuning"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= {a or b for a, b in pattern.findall(path.read_text())}
    return names


def env_names_the_code_reads() -> set[str]:
    return env_names_read_by_our_code() | set().union(*LIBRARY_ENV.values())


def test_the_library_variables_are_ones_those_libraries_read():
    """LIBRARY_ENV is not a wish list: each name appears in the library that reads it (by source
    text, without importing the library)."""
    assert "MLFLOW_TRACKING_URI" in env_names_read_by_our_code()  # tracking.resolve_tracking_uri
    sources = {
        "boto3": ["botocore/credentials.py", "botocore/configprovider.py"],
        "mlflow": ["mlflow/environment_variables.py"],
        # RAY_AUTH_TOKEN is read in Ray's C++ core; exceptions.py names it in the missing-token error.
        "ray": ["ray/_private/ray_constants.py", "ray/_private/authentication/authentication_token_setup.py", "ray/exceptions.py",
                "ray/_common/usage/usage_constants.py"],
    }
    for library, names in LIBRARY_ENV.items():
        text = ""
        for relative in sources[library]:
            package = relative.split("/")[0]
            path = Path(importlib.util.find_spec(package).origin).parent.parent / relative
            text += path.read_text() if path.exists() else ""
        for name in names:
            assert re.search(rf"[\"'`]{name}[\"'`]", text), f"{library} does not read {name}"


SERVICE_OWN_ENV = re.compile(r"POSTGRES_.*|PGPASSWORD|MINIO_.*|BUCKETS")  # read by Postgres/MinIO/our bucket script


def compose_environment(service: dict) -> dict[str, str]:
    return service.get("environment", {})


def test_the_compose_stack_is_wired_with_the_variables_the_code_reads():
    compose = load_docs(COMPOSE)[0]
    services = compose["services"]
    assert {"postgres", "minio", "create-buckets", "mlflow", "train"} <= set(services)
    code_env = env_names_the_code_reads()
    for name, service in services.items():
        for key in compose_environment(service):
            assert key in code_env or SERVICE_OWN_ENV.fullmatch(key), f"{name}: {key} is read by nothing"

    def host_port(url: str) -> tuple[str, int]:
        parsed = urlparse(url)
        return parsed.hostname, parsed.port

    # The training run finds MLflow and the S3 store by service name and container port.
    train = compose_environment(services["train"])
    assert host_port(train["MLFLOW_TRACKING_URI"]) == ("mlflow", 5000)
    assert "--port=5000" in services["mlflow"]["command"]
    assert host_port(train["AWS_ENDPOINT_URL"]) == ("minio", 9000)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(train)
    # The MLflow server writes artifacts to that store, into a bucket the one-shot service creates.
    mlflow = compose_environment(services["mlflow"])
    assert host_port(mlflow["MLFLOW_S3_ENDPOINT_URL"]) == ("minio", 9000)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"} <= set(mlflow)
    buckets = compose_environment(services["create-buckets"])["BUCKETS"].split()
    assert artifacts_bucket(services["mlflow"]["command"]) in buckets
    assert backend_host(services["mlflow"]["command"]) == "postgres"
    # MinIO's root user is the key pair the clients send.
    minio = compose_environment(services["minio"])
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (train["AWS_ACCESS_KEY_ID"], train["AWS_SECRET_ACCESS_KEY"])


def artifacts_bucket(command: list[str]) -> str:
    (flag,) = [arg for arg in command if arg.startswith("--artifacts-destination=")]
    return urlparse(flag.split("=", 1)[1]).netloc


def backend_host(command: list[str]) -> str:
    (flag,) = [arg for arg in command if arg.startswith("--backend-store-uri=")]
    uri = urlparse(flag.split("=", 1)[1])
    assert uri.scheme.startswith("postgresql") and uri.password is None
    return uri.hostname


def test_the_kubernetes_stack_is_wired_the_same_way():
    env = the_object("ConfigMap", "dcgan-env")["data"]
    assert set(env) <= env_names_the_code_reads()
    services = {doc["metadata"]["name"]: doc for _, doc in core_objects() if doc["kind"] == "Service"}

    def service_port(url: str) -> None:
        parsed = urlparse(url)
        assert parsed.port in [p["port"] for p in services[parsed.hostname]["spec"]["ports"]], url

    service_port(env["MLFLOW_TRACKING_URI"])
    service_port(env["AWS_ENDPOINT_URL"])
    service_port(env["MLFLOW_S3_ENDPOINT_URL"])
    (server,) = the_object("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert backend_host(server["command"]) in services
    buckets = the_object("Job", "create-buckets")["spec"]["template"]["spec"]["containers"][0]["env"]
    (buckets,) = [entry["value"].split() for entry in buckets if entry["name"] == "BUCKETS"]
    assert artifacts_bucket(server["command"]) in buckets
    # read off the entrypoint; that the trainer accepts it is test_the_training_rayjob_runs_the_real_module_...
    storage = flag_value(entrypoint_argv(the_object("RayJob", "dcgan-train")), "--storage-path")
    assert urlparse(storage).netloc in buckets


def test_create_buckets_creates_only_the_missing_ones(monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    spec = importlib.util.spec_from_file_location("create_buckets", INFRA / "mlflow" / "create_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with mock_aws():
        assert module.create_buckets(["mlflow-artifacts", "dcgan"]) == ["mlflow-artifacts", "dcgan"]
        assert module.create_buckets(["mlflow-artifacts", "dcgan", "more"]) == ["more"]


# ---------------------------------------------------------------- docs/cluster.md


def run_on_a_cluster_section() -> str:
    text = CLUSTER_DOC.read_text()
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert "From an empty Kubernetes cluster to a run in MLflow" in headings
    return text.split("## From an empty Kubernetes cluster to a run in MLflow", 1)[1].split("\n## ", 1)[0]


def readme_commands(section: str) -> list[str]:
    """Shell commands in the section's fenced blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_readme_train_commands_parse():
    commands = [c for c in readme_commands(run_on_a_cluster_section()) if "python -m dcgan_dist.train" in c]
    assert commands, "docs/cluster.md shows how to submit a training run to the RayCluster"
    for command in commands:
        words = shlex.split(command, comments=True)
        start = words.index("dcgan_dist.train") + 1
        try:
            config.parse(words[start:])
        except SystemExit:
            pytest.fail(f"docs/cluster.md command does not parse: {command}")
    assert any("ray job submit --address http://" in c for c in commands)
    assert any(re.search(r"--data s3://\S+/manifest\.json", c) for c in commands)


def test_the_readme_layout_lists_cluster_and_infra():
    layout = README.read_text().split("## Layout", 1)[1]
    assert re.search(r"^cluster/ infra/\s", layout, re.MULTILINE)
