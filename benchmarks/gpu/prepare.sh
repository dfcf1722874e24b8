#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before the GPU check: put into benchmarks/gpu/wheels/ what the
# GPU machine's image lacks, so that `bash benchmarks/gpu/check.sh` runs there offline.
#
#   bash benchmarks/gpu/prepare.sh                       # Python 3.12 wheels (the GPU image's python3)
#   bash benchmarks/gpu/prepare.sh --python-version 3.11 --dest /tmp/wheels311   # to test the set here
#
# The image (see the device tool's KINDS.md) has torch, torchvision, numpy, scikit-learn, pandas,
# pyarrow, fsspec, psutil, nvidia-ml-py, pyyaml, tqdm, pillow, grpcio, protobuf, msgpack, click,
# filelock, requests, aiohttp, attrs, packaging, cloudpickle, anyio, jinja2, markupsafe, zipp,
# python-dateutil, urllib3, typing-extensions; it lacks Ray, MLflow, WebDataset, boto3 and lmdb.
# Each wheel is fetched with --no-deps, so every missing dependency is named below, pinned to the
# version installed on this machine (the one the test suite passes with): one version of each.
# dcgan_dist itself is not a wheel: check.sh runs it from the source tree (PYTHONPATH).
#
# The wheels plus the source tree travel to the device machine in one call, which carries 64 MiB
# at most; this script prints the total and fails over 60 MiB. Two wheels are repacked smaller:
#   ray       ~76 MiB, of which ~31 MiB are Java jars (ray/jars) that a Python job never loads,
#             ~2.4 MiB the dashboard's web client (the image lacks the dashboard's dependencies,
#             so Ray starts without a dashboard there anyway), ~1.6 MiB RLlib (never imported by
#             Ray Train) and ~2.9 MiB the runtime-env agent's own copy of aiohttp and its helpers
#             (ray/_private/runtime_env/agent/thirdparty_files; the agent then imports the image's
#             aiohttp): all deleted, RECORD fixed, re-zipped.
#   botocore  ~15 MiB of service models; the code imports boto3 at module level (dcgan_dist/data/s3.py)
#             but the check never calls AWS: only the models of s3 and sts (and the endpoint and
#             partition tables) are kept.
# SQLAlchemy is taken as its pure-Python wheel (2 MiB instead of 5; the sqlite store needs no
# C extensions). The digits classifier that evaluation scores with is trained here once and put
# in wheels/cache/, so the GPU run does not spend its minutes training it.
set -euo pipefail
cd "$(dirname "$0")/../.."

python_version=3.12
dest=benchmarks/gpu/wheels
limit_mib=60
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) python_version="$2"; shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python}

# What the image lacks, by who needs it.
ray_deps="jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types typing-inspection"
# `import mlflow` reaches fastapi (mlflow.gateway); the sqlite store's model tables import cryptography.
mlflow_deps="mlflow-skinny cachetools databricks-sdk gitpython gitdb smmap importlib-metadata opentelemetry-api
  opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions python-dotenv sqlparse alembic mako
  fastapi starlette cryptography cffi pycparser"
data_deps="webdataset braceexpand boto3 s3transfer jmespath lmdb"
binary="ray botocore $ray_deps $mlflow_deps $data_deps"

pins() {  # NAME==VERSION of each name, from this machine's installed packages
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata as metadata, sys
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"prepare.sh: not installed here, so no version to pin: {' '.join(missing)} (pip install -e '.[dev]' first)")
PY
}

mkdir -p "$dest/cache" && rm -f "$dest"/*.whl
scratch=$(mktemp -d) && trap 'rm -rf "$scratch"' EXIT
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  $platforms -d "$scratch" $(pins $binary)
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform any -d "$dest" $(pins sqlalchemy)

# Repack a wheel without some of its files: unzip, delete, rewrite RECORD (the list of files and
# their hashes that pip checks), zip again under the same name.
repack() {  # WHEEL KEEP_PYTHON_EXPRESSION  (a path is kept where the expression on `path` is true)
  "$PYTHON" - "$1" "$2" "$dest" <<'PY'
import base64, hashlib, sys, zipfile
from pathlib import Path
source, keep_expr, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
keep = eval("lambda path: " + keep_expr)
with zipfile.ZipFile(source) as wheel:
    names = [n for n in wheel.namelist() if keep(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    rows = []
    with zipfile.ZipFile(dest / source.name, "w", zipfile.ZIP_DEFLATED) as out:
        for name in names:
            if name == record:
                continue
            data = wheel.read(name)
            info = wheel.getinfo(name)
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        rows.append(f"{record},,")
        out.writestr(wheel.getinfo(record), "\n".join(rows) + "\n", compress_type=zipfile.ZIP_DEFLATED)
print(f"repacked {source.name}: {source.stat().st_size / 2**20:.1f} -> {(dest / source.name).stat().st_size / 2**20:.1f} MiB")
PY
}
repack "$scratch"/ray-*.whl 'not path.startswith(("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/_private/runtime_env/agent/thirdparty_files/"))'
repack "$scratch"/botocore-*.whl '"/data/" not in path or path.count("/") == 2 or path.startswith(("botocore/data/s3/", "botocore/data/sts/"))'
find "$scratch" -name '*.whl' ! -name 'ray-*' ! -name 'botocore-*' -exec mv {} "$dest/" \;

# The digits classifier evaluation scores with (dcgan_dist/evaluate/backbones.py): this machine's
# cached copy, or trained now (a minute or more) when there is none.
cp -n "${DCGAN_DIST_CACHE:-$HOME/.cache/dcgan_dist}"/digits-cnn-*.pt "$dest/cache/" 2>/dev/null || true
DCGAN_DIST_CACHE="$dest/cache" PYTHONPATH="$PWD" "$PYTHON" -c \
  'from dcgan_dist.evaluate.backbones import load_digits_classifier; load_digits_classifier()'

wheels_kib=$(du -sk "$dest" | cut -f1)
tree_kib=$(git ls-files -z | xargs -0 du -ck | tail -1 | cut -f1)
total_mib=$(( (wheels_kib + tree_kib + 1023) / 1024 ))
echo "$(ls "$dest"/*.whl | wc -l) wheels in $dest: $(( wheels_kib / 1024 )) MiB; source tree: $(( tree_kib / 1024 )) MiB; total: $total_mib MiB (limit $limit_mib)"
if [ "$total_mib" -ge "$limit_mib" ]; then
  echo "prepare.sh: error: wheels + tree are $total_mib MiB, over $limit_mib MiB: the device call would not carry them" >&2
  exit 1
fi
