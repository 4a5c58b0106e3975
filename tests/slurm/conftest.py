"""The ``slurm`` tier: sweeps on a real one-node SLURM cluster started for the session.

Run it with ``python -m pytest -m slurm tests/slurm`` after
``apt-get install slurmctld slurmd slurm-client munge`` (Debian's SLURM 22.05); the
default ``python -m pytest`` deselects it. Every test under tests/slurm is marked
``slurm`` here. Missing programs fail the tier, never skip it.

``slurm_cluster`` (session) starts, as children of this process, ``munged`` (a fresh
key and socket in a temporary directory), ``slurmctld`` and ``slurmd`` (a generated
``slurm.conf``: this host's CPUs and memory as ``slurmd -C`` reports them, two
partitions, state, spool and logs in the same directory, free ports), sets
``SLURM_CONF`` so that sbatch, squeue and the jobs themselves use it, and waits until the
node is idle. At the end it cancels every job, waits for them to go, stops the three
daemons by their process ids, and kills any job process left behind (found by the
``SLURM_CONF`` of this cluster in its environment). The daemons also get SIGTERM if this
process dies first (``PR_SET_PDEATHSIG``). The directory is deleted, or kept (and named)
when a test failed, for its logs.

tests/ has no ``__init__.py``: a test file here needs a name no other test file under
tests/ has (hence ``test_slurm_*``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"
PARTITIONS = ("debug", "sweeps")  # the first is the default


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@dataclass
class Cluster:
    """A running one-node cluster: its directory, config, node name and CPU count."""

    root: Path
    conf: Path
    node: str
    cpus: int
    daemons: dict[str, subprocess.Popen]

    def run(self, *argv: str) -> str:
        """A SLURM command's output (it fails the test if the command fails)."""
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields of one job (or array task)."""
        text = self.run("scontrol", "-o", "show", "job", job_id)
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def queue(self) -> list[str]:
        """Every job this cluster still runs or queues."""
        return self.run("squeue", "-h", "-r", "-o", "%i").split()

    def unreachable(self, path: Path) -> Path:
        """This cluster's config at ``path`` with slurmctld on a port nobody listens on."""
        (closed,) = free_ports(1)
        text = re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={closed}", self.conf.read_text())
        path.write_text(text)
        return path

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name} (end)\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_line() -> tuple[str, int, str]:
    """This host as ``slurmd -C`` sees it: its name, CPU count and NodeName line."""
    first = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
    line = first.stdout.splitlines()[0]
    fields = dict(f.split("=", 1) for f in line.split())
    return fields["NodeName"], int(fields["CPUs"]), line


def write_config(root: Path) -> tuple[Path, str, int]:
    """``root/slurm.conf`` for a one-node cluster of this host."""
    node, cpus, line = _node_line()
    ctld_port, slurmd_port = free_ports(2)
    settings = {
        "ClusterName": "icl-lens-test",
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        # cred_expire also delays a requeued job's restart (default 120 s)
        "AuthInfo": f"socket={root / 'munge' / 'munge.socket'},cred_expire=10",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "log" / "slurmctld.log",
        "SlurmdLogFile": root / "log" / "slurmd.log",
        # no systemd or cgroups in a container: track processes by their parents
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "MpiDefault": "none",
        "MailProg": "/bin/true",
        "SchedulerType": "sched/backfill",
        # a requeued job starts within seconds of its begin time, not at the next minute
        "SchedulerParameters": "sched_interval=2,bf_interval=1",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "DefMemPerCPU": 1024,
        "ReturnToService": 2,
        "KillWait": 5,
        "MinJobAge": 300,
    }
    text = "\n".join(f"{k}={v}" for k, v in settings.items())
    text += f"\n{line.replace(f'NodeName={node}', f'NodeName={node} NodeAddr=127.0.0.1')}"
    text += f" State=UNKNOWN\nPartitionName={PARTITIONS[0]} Nodes=ALL Default=YES"
    text += f" MaxTime=INFINITE State=UP\nPartitionName={PARTITIONS[1]} Nodes=ALL MaxTime=60"
    text += " State=UP\n"
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf, node, cpus


def _start(argv: list[str], root: Path, name: str, env: dict) -> subprocess.Popen:
    with open(root / "log" / f"{name}.out", "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )


def _wait(predicate, what: str, cluster_root: Path, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; logs in {cluster_root / 'log'}")


def _job_processes(conf: Path) -> list[int]:
    """Processes (job steps, workers) whose environment names this cluster's config."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def slurm_cluster(request):
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(f"the slurm tier needs {', '.join(missing)} on PATH: {INSTALL}")
    # munged wants every directory above its socket searchable by all
    root = Path(tempfile.mkdtemp(prefix="icl-lens-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf, node, cpus = write_config(root)
    env = os.environ | {"SLURM_CONF": str(conf)}
    daemons: dict[str, subprocess.Popen] = {}
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    cluster = Cluster(root, conf, node, cpus, daemons)
    try:
        munge = root / "munge"
        daemons["munged"] = _start(
            [
                "munged",
                "--foreground",
                f"--key-file={key}",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={root / 'log' / 'munged.log'}",
            ],
            root,
            "munged",
            env,
        )
        _wait(lambda: (munge / "munge.socket").exists(), "munged's socket", root)
        daemons["slurmctld"] = _start(["slurmctld", "-D", "-f", str(conf)], root, "slurmctld", env)
        daemons["slurmd"] = _start(["slurmd", "-D", "-f", str(conf)], root, "slurmd", env)

        def idle() -> bool:
            for name, process in daemons.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited ({process.returncode}):\n{cluster.logs()}")
            done = subprocess.run(
                ["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True
            )
            return done.stdout.strip() == "idle"

        _wait(idle, f"node {node} to be idle", root)
        yield cluster
    finally:
        _teardown(cluster, old_conf)
        if request.session.testsfailed:
            print(f"\nslurm tier: the cluster's config and logs are kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _teardown(cluster: Cluster, old_conf: str | None) -> None:
    """Cancel every job, stop the daemons, kill what a job left behind; then restore
    ``SLURM_CONF``."""
    daemons = cluster.daemons
    if daemons.get("slurmctld") and daemons["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            jobs = cluster.queue()
            if jobs:
                subprocess.run(["scancel", *jobs], timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and cluster.queue():
                time.sleep(0.5)
    for name in ("slurmd", "slurmctld", "munged"):
        if name in daemons:
            _stop(daemons[name])
    for pid in _job_processes(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if old_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old_conf
