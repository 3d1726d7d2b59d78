"""Where runs go, checked cheaply: no MLflow import, so a dead server is reported at once."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from urllib.parse import unquote, urlparse, urlunparse

from ..errors import UserError

DEFAULT_EXPERIMENT = "zar"
ENV_RUN_ID = "MLFLOW_RUN_ID"  # set by 'mlflow run' to the run it created for the command it runs


def redact(uri: str) -> str:
    """``uri`` without its password (``http://user:***@host``): what a message or a link may show."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    host = parsed.netloc.rpartition("@")[2]
    return urlunparse(parsed._replace(netloc=f"{parsed.username}:***@{host}"))


def without_credentials(uri: str) -> str:
    """``uri`` with no user or password at all: the address a browser link points at."""
    parsed = urlparse(uri)
    return urlunparse(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))


def probe_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Raise UserError unless the tracking server at ``uri`` (default: MLFLOW_TRACKING_URI) answers HTTP.

    MLflow's client retries a dead server for minutes; one request with a timeout says it in seconds.
    Credentials in the URI (``http://user:pass@host``) go as basic auth, as MLflow's client sends them.
    Non-HTTP stores (SQLite, files) are not probed here.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    request = urllib.request.Request(f"{without_credentials(uri).rstrip('/')}/health")
    if parsed.username is not None:
        pair = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered: a server is there
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or reason
        raise UserError(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({reason}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None
