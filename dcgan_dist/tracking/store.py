"""Where MLflow runs go: the tracking URI, the driver's preflight, the experiment, params.

The driver resolves the tracking URI and makes sure the experiment exists before Ray starts a
worker, so a wrong URI is one line at start-up, not a failed worker.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import mlflow.exceptions
import requests
from mlflow import MlflowClient
from mlflow.entities import Param

from dcgan_dist.util import redact

DEFAULT_STORE = "mlflow.db"  # sqlite: the model registry needs a database store
# MLflow's client prints "View run ... at: <tracking URI>/#/..." when a run ends, user:password@ included.
QUIET_RUN_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


class TrackingError(RuntimeError):
    pass


# What a tracking server that is away raises through MLflow's client (after its own HTTP retries).
TRACKING_FAILURES = (TrackingError, mlflow.exceptions.MlflowException, requests.exceptions.RequestException, OSError)


def resolve_tracking_uri(flag_value: str) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. Local sqlite
    paths become absolute, since Ray workers run in another working directory. A URI with
    user:password@ turns off MLflow's printed run links in this process (QUIET_RUN_LINKS)."""
    uri = flag_value or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if redact(uri) != uri:
        os.environ[QUIET_RUN_LINKS] = "true"
    return uri


def split_credentials(uri: str) -> tuple[str, str, str]:
    """(the URI without user:password@, the user, the password), the last two "" when it has
    none. MLflow's client accepts http://user:password@host (requests sends them as basic
    auth); urllib would take user:password@host for a host name."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, "", ""
    userinfo, _, host = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(username),
            urllib.parse.unquote(password))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError naming the URI when the store cannot be used. A server must answer
    /health and an authenticated read (a basic-auth server leaves /health open), so missing or
    wrong MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or user:password@ in the URI)
    fail here, not in a worker."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
    elif uri.startswith(("http://", "https://")):
        base = split_credentials(uri)[0].rstrip("/")
        try:
            urllib.request.urlopen(base + "/health", timeout=timeout_s).close()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable: {e}") from None
        check_credentials(uri)


def check_credentials(uri: str, timeout_s: float = 30.0) -> None:
    """One read the server authorises as MLflow's client would (basic auth from
    MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, else from the URI's user:password@, else
    a bearer MLFLOW_TRACKING_TOKEN). The server is up by now; a longer timeout than /health's,
    since checking a password costs a slow hash on the server. The error names the user, never
    the password."""
    base, username, password = split_credentials(uri)
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        username, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    request = urllib.request.Request(base.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    if username and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"])
    try:
        urllib.request.urlopen(request, timeout=timeout_s).close()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            raise TrackingError(f"MLflow tracking server {redact(uri)} answered HTTP {e.code} to an experiment search: {e.reason}") from None
        if e.code == 403:
            problem = f"user {username or '(anonymous)'!r} may not read experiments (HTTP 403)"
        elif username and password:
            problem = f"it rejected the credentials of user {username!r} (HTTP 401)"
        else:
            problem = "it requires authentication (HTTP 401) and MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD are not both set"
        raise TrackingError(f"MLflow tracking server {redact(uri)}: {problem}; set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD to a user of that server (an admin grants permissions)") from None
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow tracking server {redact(uri)} answered /health but not an experiment search: {e}") from None


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Params as strings, credentials redacted, in log_batch's chunks of at most 100."""
    items = [Param(key, str(redact(value))) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or pick another --experiment")
        return experiment.experiment_id
    return client.create_experiment(name)
