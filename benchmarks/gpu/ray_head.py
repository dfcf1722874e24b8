"""One local Ray instance for all of check.sh's training runs: each `dcgan_dist.train` joins it
(RAY_ADDRESS) instead of starting and stopping its own, which costs tens of seconds a run.

    python benchmarks/gpu/ray_head.py ADDRESS_FILE &    # writes HOST:PORT of the GCS, then waits
    kill $!                                             # SIGTERM: shuts down what it started

The instance lives as long as this driver: on SIGTERM it calls ray.shutdown(), which stops the
processes of this instance only (never `ray stop`, which stops every Ray instance on the machine).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import ray


def main(address_file: str) -> int:
    stop = threading.Event()
    context = ray.init(address="local", include_dashboard=False)
    # after ray.init, which installs handlers of its own
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    partial = Path(address_file + ".partial")
    partial.write_text(context.address_info["gcs_address"])
    partial.replace(address_file)
    print(f"Ray instance at {context.address_info['gcs_address']}: {ray.cluster_resources()}", flush=True)
    stop.wait()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
