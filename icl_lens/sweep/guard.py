"""One sweep of a directory at a time: what of an earlier sweep still runs.

Three things can still be running when ``icl-lens sweep`` is called again on a ``DIR``:

- the earlier ``icl-lens sweep`` command itself (any executor, ``debug`` included): it
  holds ``DIR/.sweep.lock`` for as long as it runs;
- a worker, wherever it runs (a local subprocess whose submitit controller was killed,
  a SLURM job): it holds ``DIR/locks/<host>-<pid>.lock`` while it runs, next to a JSON
  file naming its host, process and job;
- a job not started yet, or between two requeues: from ``DIR/jobs.json``. A local job
  id is its controller's process id; one alive that is not a submitit controller of
  ``DIR`` (the id was reused) is stale and ignored. A SLURM job blocks while ``squeue``
  (or ``sacct``) lists it in a state that can still run a cell (pending, held,
  requeued, running, ...; :mod:`icl_lens.sweep.slurm`); a SLURM that cannot be asked
  blocks too, saying so.

The locks are operating-system locks (``filelock``): they go when their process dies,
however it dies, so a killed sweep never blocks the next one.

>>> import tempfile
>>> active_jobs(tempfile.mkdtemp())
[]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from icl_lens.files import atomic_write_text
from icl_lens.sweep.grid import GridError
from icl_lens.sweep.slurm import SlurmQueryError, job_states

__all__ = ["SWEEP_LOCK", "active_jobs", "hold_sweep", "hold_worker", "read_jobs"]

SWEEP_LOCK = ".sweep.lock"
WORKER_LOCKS = "locks"


def _free(path: Path) -> bool:
    """Whether nobody holds the lock at ``path`` (taken and released at once)."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    lock.release()
    return True


@contextlib.contextmanager
def hold_sweep(root: Path) -> Iterator[None]:
    """Hold ``root``'s sweep lock while the body runs; refuse if another sweep holds it."""
    lock = FileLock(str(root / SWEEP_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise GridError(
            f"another icl-lens sweep of {root} is running (it holds {root / SWEEP_LOCK}); "
            "wait for it to end, or stop it, then run the same command again"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def hold_worker(root: Path, job_id: str | None) -> Iterator[None]:
    """Hold a lock of this worker process under ``root/locks`` while the body runs."""
    folder = root / WORKER_LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{socket.gethostname()}-{os.getpid()}"
    info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id}
    lock = FileLock(str(folder / f"{name}.lock"), timeout=60)
    lock.acquire()
    try:
        atomic_write_text(folder / f"{name}.json", json.dumps(info) + "\n")
        yield
    finally:
        (folder / f"{name}.json").unlink(missing_ok=True)
        lock.release()


def _running_workers(root: Path) -> list[str]:
    found = []
    for path in sorted((root / WORKER_LOCKS).glob("*.lock")):
        if _free(path):  # its worker is gone (the file stays: unlinking it could race
            continue  # a worker that has opened it and is about to lock it)
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            job = f", job {info['job_id']}" if info.get("job_id") else ""
            found.append(f"worker pid {info['pid']} on {info['host']}{job}")
        except (OSError, ValueError, KeyError, TypeError):
            found.append(f"the worker holding {path}")
    return found


def read_jobs(root: Path) -> dict:
    """``root/jobs.json`` ({} when absent); a damaged one is refused naming the file."""
    path = root / "jobs.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise GridError(
            f"{path} is not readable JSON ({err}); if no job of an earlier sweep of {root} "
            "still runs, delete it and run the same command again"
        ) from None
    jobs = record.get("jobs") if isinstance(record, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and "job_id" in j for j in jobs):
        raise GridError(
            f"{path} is not a jobs record (a list of jobs with job_id); if no job of an "
            f"earlier sweep of {root} still runs, delete it and run the same command again"
        )
    return record


def _local_controller_of(pid: int, root: Path) -> bool | None:
    """Whether process ``pid`` is submitit's local controller for ``root/logs`` (None:
    cannot tell on this system, or it is gone)."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        return None
    try:
        argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False  # gone, or not ours to read
    if argv == [""]:  # between fork and exec: cannot tell yet
        return None
    if "submitit.local._local" not in argv:
        return False
    folder = Path(cwd, argv[argv.index("submitit.local._local") + 1])
    return folder.resolve() == (root / "logs").resolve()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_jobs(root: Path) -> list[str]:
    record = read_jobs(root)
    found = []
    for job in record.get("jobs", []):
        job_id = str(job["job_id"])
        if record.get("executor") == "local" and job_id.isdigit() and _alive(int(job_id)):
            ours = _local_controller_of(int(job_id), root)
            if ours:
                found.append(f"local job {job_id}")
            elif ours is None:
                found.append(
                    f"local job {job_id} (process {job_id} is alive; if it is no icl-lens "
                    f"worker, the id was reused: delete {root / 'jobs.json'})"
                )
    if record.get("executor") == "slurm":
        found += _queued_slurm_jobs(root, [str(job["job_id"]) for job in record["jobs"]])
    return found


def _queued_slurm_jobs(root: Path, job_ids: list[str]) -> list[str]:
    """The jobs of ``job_ids`` SLURM still holds in a state that can run a cell: pending
    (queued, held, requeued) or running."""
    if shutil.which("squeue") is None:  # no SLURM here (a copied directory)
        return []
    try:
        states = job_states(job_ids)
    except SlurmQueryError as err:
        raise GridError(
            f"cannot tell whether the SLURM jobs of an earlier sweep of {root} still run "
            f"({err}); once squeue answers, run the same command again (or, if none of the "
            f"jobs in {root / 'jobs.json'} can run any more, delete that file)"
        ) from None
    return [
        f"SLURM job {job_id} ({states[job_id]})"
        for job_id in job_ids
        if job_id in states and not states[job_id].ended
    ]


def active_jobs(root: str | Path, *, command: bool = True) -> list[str]:
    """What of an earlier sweep of ``root`` still runs, one description each
    (``command=False``: not the sweep command itself, for the sweep that holds its lock)."""
    root = Path(root)
    busy = command and not _free_or_absent(root / SWEEP_LOCK)
    found = ["another icl-lens sweep command"] if busy else []
    return found + _running_workers(root) + _running_jobs(root)


def _free_or_absent(path: Path) -> bool:
    return not path.exists() or _free(path)
