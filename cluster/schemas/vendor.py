"""Re-vendor the KubeRay CRD schemas the manifest tests validate against.

    python cluster/schemas/vendor.py PATH/TO/kuberay/ray-operator/config/crd/bases COMMIT

Keeps only the ray.io/v1 openAPIV3Schema of RayCluster and RayJob (the full CRDs are ~2 MiB,
mostly the v1alpha1 copies), so the tests run on a clone with nothing else checked out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
CRDS = {"rayclusters": "RayCluster", "rayjobs": "RayJob"}


def main(crd_folder: str, commit: str) -> None:
    for plural, kind in CRDS.items():
        crd = yaml.safe_load(Path(crd_folder, f"ray.io_{plural}.yaml").read_text())
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        out = HERE / f"{kind.lower()}-ray.io-v1.json"
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{out}: {out.stat().st_size} bytes")
    (HERE / "SOURCE").write_text(
        "ray.io/v1 openAPIV3Schema of the RayCluster and RayJob CRDs from github.com/ray-project/kuberay,\n"
        f"ray-operator/config/crd/bases/ at commit {commit}; extracted by vendor.py.\n"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
