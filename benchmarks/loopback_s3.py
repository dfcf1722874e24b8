"""A loopback S3 endpoint for the benchmarks: `moto_server` in its own process on a free port of
127.0.0.1 (a server thread in the benchmark's process would share its GIL)."""

from __future__ import annotations

import socket
import subprocess
import time


def start_moto_server() -> tuple[subprocess.Popen, str]:
    """(the server process, its URL) once it accepts connections (10 s at most)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"
