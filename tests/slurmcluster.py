"""A throwaway single-node Slurm cluster for the tests, from Debian's packages, on loopback only.

munged, MariaDB (for slurmdbd: submitit reads job states with ``sacct``, which needs accounting),
slurmdbd, slurmctld and slurmd, each with its config, socket, state and logs in one folder under
/tmp, on free ports, torn down after. Clients find it through ``SLURM_CONF``; nothing under /etc
changes. .ci/run installs the packages; without them the tests that need a cluster skip, unless
ZAR_REQUIRE_SLURM is set (CI sets it): then they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def require() -> None:
    missing = [d for d in DAEMONS if _which(d) is None]
    if not missing:
        return
    message = (
        f"no {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server "
        "(CI installs them)"
    )
    if os.environ.get("ZAR_REQUIRE_SLURM"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Cluster:
    folder: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str) -> str:
        return subprocess.run(
            list(cmd), env={**os.environ, **self.env}, check=True, capture_output=True, text=True
        ).stdout

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait(what: str, ready, folder: Path, log: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = (folder / log).read_text(errors="replace")[-2000:] if (folder / log).exists() else "(no log)"
    raise RuntimeError(f"{what} did not start in {timeout} s; {log}:\n{tail}")


def found_log(folder: Path, name: str) -> str:
    path = folder / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def cluster(cpus: int | None = None) -> Iterator[Cluster]:
    require()
    folder = Path(tempfile.mkdtemp(prefix="zar-slurm-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    db_port, dbd_port, ctld_port, slurmd_port = _free_ports(4)
    munge_socket = folder / "munge.socket"
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    try:

        def start(name: str, cmd: list[str]) -> None:
            log = open(folder / f"{name}.log", "ab")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        # munge: its own key and socket, so that nothing of the machine's munge is used or needed.
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        subprocess.run(
            [
                _which("munged"), "--force", f"--socket={munge_socket}", f"--key-file={key}",
                f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                f"--seed-file={folder / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        _wait("munged", munge_socket.exists, folder, "munged.log")

        # MariaDB for slurmdbd, on loopback, without grant tables: a throwaway that only slurmdbd uses.
        data = folder / "mariadb"
        subprocess.run(
            [_which("mariadb-install-db"), f"--datadir={data}", f"--user={user}", "--skip-test-db",
             "--auth-root-authentication-method=normal"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        start(
            "mariadb",
            [
                _which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--user={user}", f"--port={db_port}",
                "--bind-address=127.0.0.1", f"--socket={folder / 'mariadb.socket'}", "--skip-grant-tables",
                f"--pid-file={folder / 'mariadb.pid'}", "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
            ],
        )  # fmt: skip
        _wait("MariaDB", lambda: _listening(db_port), folder, "mariadb.log")

        common = [
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge_socket}",
        ]
        dbd_conf = folder / "slurmdbd.conf"
        dbd_conf.write_text(
            "\n".join(
                [
                    *common,
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={dbd_port}",
                    f"SlurmUser={user}",
                    f"PidFile={folder / 'slurmdbd.pid'}",
                    f"LogFile={folder / 'slurmdbd.log'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={db_port}",
                    "StorageUser=root",
                    "StorageLoc=zar_slurm_acct",
                ]
            )
            + "\n"
        )
        dbd_conf.chmod(0o600)
        conf = folder / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=zar",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    *common,
                    "CredType=cred/munge",
                    f"SlurmUser={user}",
                    f"SlurmdUser={user}",
                    f"StateSaveLocation={folder / 'state'}",
                    f"SlurmdSpoolDir={folder / 'spool'}",
                    f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                    f"SlurmdPidFile={folder / 'slurmd.pid'}",
                    f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                    f"SlurmdLogFile={folder / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SwitchType=switch/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    "AccountingStorageHost=localhost",
                    f"AccountingStoragePort={dbd_port}",
                    f"AccountingStoragePass={munge_socket}",  # the munge socket of connections to slurmdbd
                    "JobCompType=jobcomp/none",
                    "KillWait=5",
                    "MinJobAge=600",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "InactiveLimit=0",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        (folder / "state").mkdir()
        (folder / "spool").mkdir()
        env = {**os.environ, "SLURM_CONF": str(conf)}
        procs.append(
            subprocess.Popen(
                [_which("slurmdbd"), "-D"],
                env=env,
                stdout=open(folder / "slurmdbd.out", "ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait("slurmdbd", lambda: _listening(dbd_port), folder, "slurmdbd.log")
        added = subprocess.run(
            [_which("sacctmgr"), "-i", "add", "cluster", "zar"], env=env, capture_output=True, text=True
        )
        if added.returncode != 0:
            raise RuntimeError(
                f"sacctmgr add cluster failed: {added.stderr.strip()}; slurmdbd.log:\n{found_log(folder, 'slurmdbd')}"
            )
        for daemon in ("slurmctld", "slurmd"):
            procs.append(
                subprocess.Popen(
                    [_which(daemon), "-D"],
                    env=env,
                    stdout=open(folder / f"{daemon}.out", "ab"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        found = Cluster(folder, conf)

        def node_idle() -> bool:
            try:
                return "idle" in found.run(_which("sinfo"), "-h", "-o", "%t")
            except subprocess.CalledProcessError:
                return False

        _wait("slurmctld and slurmd", node_idle, folder, "slurmctld.log")
        yield found
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                [_which("scancel") or "scancel", "--user", user],
                env={**os.environ, "SLURM_CONF": str(folder / "slurm.conf")},
                capture_output=True,
                timeout=10,
            )
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pid = folder / "munged.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text().strip()), signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
