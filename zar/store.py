"""Where runs go, checked cheaply: no MLflow import, so a dead server is reported at once."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlparse

from .errors import ZarError

DEFAULT_EXPERIMENT = "zar"


def probe_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Raise ZarError unless the tracking server at ``uri`` (default: MLFLOW_TRACKING_URI) answers HTTP.

    MLflow's client retries a dead server for minutes; one request with a timeout says it in seconds.
    Non-HTTP stores (SQLite, files) are not probed here.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered: a server is there
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or reason
        raise ZarError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); "
            "start it or unset MLFLOW_TRACKING_URI to use the local mlflow.db"
        ) from None
