"""Where runs go, checked cheaply: no MLflow import, so a dead server is reported at once."""

from __future__ import annotations

import base64
import os
import re
import urllib.error
import urllib.request
from urllib.parse import urlparse

from ..errors import UserError

DEFAULT_EXPERIMENT = "zar"
ENV_RUN_ID = "MLFLOW_RUN_ID"  # set by 'mlflow run' to the run it created for the command it runs


# Any URL's user:password@ in free text (a library's error message), read as SQLAlchemy reads a
# URL: the password runs to the first '@', so it may hold '/', '?' and '#'.
CREDENTIALS = re.compile(r"(\b[A-Za-z][\w+.-]*://[^:/@\s]*):[^@\s]*@")


def _url(uri: str):
    """``uri`` as SQLAlchemy's ``make_url`` reads it (what the database client and MLflow's SQL store
    read), or None for a URI with no credentials or no URL at all. urlparse would take a password
    holding '/', '?' or '#' for the path, query or fragment, and print it."""
    if "://" not in uri or "@" not in uri:
        return None
    from sqlalchemy.engine.url import make_url  # 0.2 s to import: only for a URI that needs it
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri)
    except (ArgumentError, ValueError):
        return None


def redact(uri: str) -> str:
    """``uri`` without its password (``postgresql://user:***@host/db``): what a message, tag, param or
    report may show."""
    url = _url(uri)
    if url is None:
        return redact_text(uri)  # not a URL SQLAlchemy reads: mask what looks like credentials anyway
    return url.render_as_string(hide_password=True) if url.password is not None else uri


def without_credentials(uri: str) -> str:
    """``uri`` with no user or password at all: the address a browser link points at."""
    url = _url(uri)
    if url is None:
        return uri
    return url._replace(username=None, password=None).render_as_string(hide_password=False)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it masked, and the tracking URI's password wherever
    a library's message repeated it on its own."""
    text = CREDENTIALS.sub(r"\1:***@", text)
    url = _url(os.environ.get("MLFLOW_TRACKING_URI", ""))
    password = url.password if url is not None else None
    return text.replace(password, "***") if password else text


def probe_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Raise UserError unless the tracking server at ``uri`` (default: MLFLOW_TRACKING_URI) answers HTTP.

    MLflow's client retries a dead server for minutes; one request with a timeout says it in seconds.
    Credentials in the URI (``http://user:pass@host``) go as basic auth, as MLflow's client sends them.
    Non-HTTP stores (SQLite, files) are not probed here.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlparse(uri).scheme not in ("http", "https"):
        return
    request = urllib.request.Request(f"{without_credentials(uri).rstrip('/')}/health")
    url = _url(uri)
    if url is not None and url.username is not None:
        pair = f"{url.username}:{url.password or ''}"
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
