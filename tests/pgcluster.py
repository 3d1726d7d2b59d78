"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, loopback only, removed after.

Debian's ``postgresql`` package provides the binaries (.ci/run installs it). initdb refuses to
run as root, so as root the cluster belongs to the ``postgres`` user, in a folder under /tmp that
user can enter (pytest's own temporary folders are root's alone). Without the binaries the tests
that need a cluster skip, unless ZAR_REQUIRE_POSTGRES is set (CI sets it): then they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available() -> bool:
    return find_bin("initdb") is not None and find_bin("pg_ctl") is not None


def require() -> None:
    """Skip (or, under ZAR_REQUIRE_POSTGRES, fail) when there is no PostgreSQL to start."""
    if available():
        return
    message = "no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql (CI installs it)"
    if os.environ.get("ZAR_REQUIRE_POSTGRES"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Cluster:
    port: int
    folder: Path

    def url(self, database: str) -> str:
        """SQLAlchemy's URL of a database (psycopg 3), as MLflow and Optuna take it."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    require()
    folder = Path(tempfile.mkdtemp(prefix="zar-pg-", dir="/tmp"))
    data = folder / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        subprocess.run(
            _as_owner(
                [find_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )
        port = _free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=50"
        subprocess.run(
            _as_owner([find_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )
        try:
            yield Cluster(port, folder)
        finally:
            subprocess.run(
                _as_owner([find_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
