"""Screenshots of the MLflow UI, taken by headless Chromium from a local `mlflow ui`: a training
run's page, a sweep's comparison (the saved view the sweep wrote) and the experiment's Models tab.

    python benchmarks/screenshots.py --backend-store-uri sqlite:///mlflow.db --experiment dcgan \\
        --sweep-experiment ablation --out docs/

The run is the newest run of --experiment that is no sweep's, the sweep the newest sweep parent
run of --sweep-experiment. Needs Debian's `chromium` (/usr/bin/chromium: `apt-get install -y
chromium`); without it the script says so and exits 0, taking nothing. Each picture is written
as a palette PNG (a few hundred KB at most) and its size printed in a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dcgan_dist.util import OneLineErrorParser  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="benchmarks/screenshots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///mlflow.db", help="the MLflow store `mlflow ui` serves")
    parser.add_argument("--experiment", default="dcgan", help="the experiment of the training run (and its Models tab)")
    parser.add_argument("--sweep-experiment", default="ablation", help="the experiment of the sweep")
    parser.add_argument("--out", default="docs", help="folder the PNGs are written to")
    parser.add_argument("--width", type=int, default=1900, help="browser window width in pixels")
    parser.add_argument("--height", type=int, default=1050, help="browser window height in pixels")
    parser.add_argument("--wait-ms", type=int, default=60000, help="virtual time the page gets to load before the picture")
    return parser.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ui(store_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1, answering /health."""
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1"], env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return process
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow ui did not answer /health within 120 s")

# MLflow 3.17's UI opens in its GenAI mode ("Agent versions" for the Models tab) unless the URL or
# the browser's stored choice says otherwise; a fresh profile has no stored choice.
MODEL_TRAINING = "workflowType=machine_learning"


def pages(store_uri: str, experiment: str, sweep_experiment: str, base: str) -> dict[str, str]:
    """{file name: URL} of the three pictures, from the store's runs."""
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    urls = {}
    training = client.get_experiment_by_name(experiment)
    if training:
        runs = [run for run in client.search_runs([training.experiment_id], order_by=["attributes.start_time DESC"])
                if "sweep.kind" not in run.data.tags and "mlflow.parentRunId" not in run.data.tags]
        if runs:
            urls["mlflow-run-page.png"] = f"{base}/#/experiments/{training.experiment_id}/runs/{runs[0].info.run_id}?{MODEL_TRAINING}"
        urls["mlflow-models-tab.png"] = f"{base}/#/experiments/{training.experiment_id}/models?{MODEL_TRAINING}"
    sweep = client.get_experiment_by_name(sweep_experiment)
    if sweep:
        parents = client.search_runs([sweep.experiment_id], filter_string="tags.`sweep.kind` = 'parent'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if parents and "sweep.view" in parents[0].data.tags:
            view = parents[0].data.tags["sweep.view"]
            urls["mlflow-sweep-comparison.png"] = base + view[view.index("/#/"):] + ("" if MODEL_TRAINING in view else f"&{MODEL_TRAINING}")
    return urls


def screenshot(url: str, path: Path, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}",
                   f"--virtual-time-budget={args.wait_ms}", f"--screenshot={path}", url]
        subprocess.run(command, check=True, capture_output=True, timeout=180)


def shrink(path: Path) -> None:
    """A 256-colour palette PNG: the UI's flat colours survive, the file is a fraction of the size."""
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        print(f"screenshots skipped: no Chromium at {CHROMIUM} (apt-get install -y chromium)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    urls = pages(args.backend_store_uri, args.experiment, args.sweep_experiment, base)
    with tempfile.TemporaryDirectory() as scratch:
        ui = start_ui(args.backend_store_uri, port, Path(scratch) / "mlflow-ui.log")
        try:
            print("| picture | bytes | page |\n|---|---|---|")
            for name, url in urls.items():
                screenshot(url, out / name, args)
                shrink(out / name)
                print(f"| {out / name} | {(out / name).stat().st_size} | {url.removeprefix(base)} |")
        finally:
            os.killpg(ui.pid, 15)
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
