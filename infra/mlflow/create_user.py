"""Create the MLflow user the training pods log as, if it does not exist yet.

Run once against the basic-auth server (compose's `create-mlflow-user`, the k8s Job in
infra/k8s/mlflow.yaml), as the admin: MLFLOW_TRACKING_URI, MLFLOW_AUTH_ADMIN_USERNAME and
MLFLOW_AUTH_ADMIN_PASSWORD (the server's own admin variables), MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (the user to create: the variables the training code sends). Retries while
the server starts; never prints a password.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def call(uri: str, admin: tuple[str, str], method: str, path: str, body: dict | None = None, timeout_s: float = 10.0):
    """The JSON answer of one REST call as the admin; raises urllib.error.HTTPError."""
    request = urllib.request.Request(uri.rstrip("/") + path, method=method, data=json.dumps(body).encode() if body else None)
    request.add_header("Authorization", "Basic " + base64.b64encode(":".join(admin).encode()).decode())
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read() or b"{}")


def create_user(uri: str, admin: tuple[str, str], username: str, password: str, attempts: int = 60, wait_s: float = 2.0) -> bool:
    """Create `username` unless it exists; True if it was created. An existing user keeps its
    password (rotate it with the update-password API)."""
    for attempt in range(attempts):
        try:
            call(uri, admin, "GET", "/api/2.0/mlflow/users/get?" + urllib.parse.urlencode({"username": username}))
            return False
        except urllib.error.HTTPError as e:
            if e.code == 404:
                break
            if e.code in (401, 403):
                sys.exit(f"create_user.py: {uri} refused the admin credentials (HTTP {e.code}): check MLFLOW_AUTH_ADMIN_*")
            error = e
        except OSError as e:  # not up yet
            error = e
        if attempt == attempts - 1:
            sys.exit(f"create_user.py: {uri} did not answer after {attempts} attempts: {error}")
        time.sleep(wait_s)
    call(uri, admin, "POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
    return True


if __name__ == "__main__":
    env = os.environ
    missing = [name for name in ("MLFLOW_TRACKING_URI", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if not env.get(name)]
    if missing:
        sys.exit(f"create_user.py: set {', '.join(missing)}")
    admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    created = create_user(env["MLFLOW_TRACKING_URI"], admin, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    print(f"user {env['MLFLOW_TRACKING_USERNAME']}: {'created' if created else 'exists'}")
