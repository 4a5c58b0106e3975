"""What SLURM says about a sweep's jobs: their states, and how a job that left no result
ended.

submitit reads job states from ``sacct`` alone. A cluster that keeps no accounting
(no slurmdbd: ``sacct`` answers "Slurm accounting storage is disabled") then reports
every job as UNKNOWN, which submitit counts as still running: a job cancelled before it
wrote its result was followed forever, and a queued job did not block a second sweep.
Here ``squeue`` comes first (it knows every job slurmctld holds: pending, running,
requeued, and for ``MinJobAge``, 300 s by default, after it ended, its final state),
then ``sacct`` for the jobs ``squeue`` no longer knows, where the cluster keeps
accounting. A job neither knows has ended: it was purged from slurmctld's memory.

>>> parse_squeue("8_0|RUNNING|None\\n8_1|PENDING|Resources\\n")["8_1"]
SlurmState(state='PENDING', reason='Resources')
>>> SlurmState("CANCELLED", "None").ended
True
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ENDED",
    "SlurmQueryError",
    "SlurmState",
    "describe_end",
    "job_states",
    "parse_squeue",
    "slurm_end_line",
]

ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
"""SLURM's final job states; every other state (PENDING, RUNNING, REQUEUED, SUSPENDED,
COMPLETING, REQUEUE_HOLD, ...) can still run a cell."""
QUERY_TIMEOUT_S = 60
_END_LINE = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+(?: DUE TO [A-Z ]+?)? \*\*\*")


class SlurmQueryError(RuntimeError):
    """squeue could not be asked (slurmctld unreachable, a timeout)."""


@dataclass(frozen=True)
class SlurmState:
    """A job's state (``RUNNING``, ``CANCELLED``, ...) and what SLURM adds: squeue's
    reason (why it is pending), or sacct's ``by <uid>`` of a cancelled job."""

    state: str
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def __str__(self) -> str:
        shown = self.reason and self.reason not in ("None", "(null)")
        return f"{self.state.lower()}: {self.reason}" if shown else self.state.lower()


def parse_squeue(text: str) -> dict[str, SlurmState]:
    """``squeue -h -o '%i|%T|%r'`` lines, by job id."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0]:
            out[parts[0]] = SlurmState(parts[1], parts[2])
    return out


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmQueryError(f"{argv[0]} did not answer in {QUERY_TIMEOUT_S} s") from None


def _squeue(job_ids: Sequence[str]) -> dict[str, SlurmState]:
    argv = ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r", "-j", ",".join(job_ids)]
    done = _run(argv)
    if done.returncode:
        error = " ".join(done.stderr.split())
        if "Invalid job id" in error:  # none of them is known any more
            return {}
        raise SlurmQueryError(f"`{' '.join(argv)}` failed: {error or done.returncode}")
    return parse_squeue(done.stdout)


def _sacct(job_ids: Sequence[str]) -> dict[str, SlurmState]:
    """Final states from accounting; {} where the cluster keeps none."""
    if shutil.which("sacct") is None:
        return {}
    argv = ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)]
    done = _run(argv)
    if done.returncode:  # "Slurm accounting storage is disabled"
        return {}
    out = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids and state:
            name, _, by = state.partition(" ")
            out[job_id] = SlurmState(name, by)
    return out


def job_states(job_ids: Sequence[str]) -> dict[str, SlurmState]:
    """The state of each of ``job_ids`` SLURM still knows (``8_0`` names task 0 of array
    job 8); a job absent from the answer has ended and been purged. Raises
    :class:`SlurmQueryError` when squeue cannot be asked."""
    job_ids = [str(j) for j in job_ids]
    if not job_ids:
        return {}
    found = _squeue(job_ids)
    missing = [j for j in job_ids if j not in found]
    return found | (_sacct(missing) if missing else {})


def slurm_end_line(log: str) -> str:
    """The last ``*** JOB 9 ON node CANCELLED AT ... [DUE TO TIME LIMIT] ***`` line that
    slurmstepd wrote into a job's log ('' if none; a requeue's line is no end).

    >>> slurm_end_line("slurmstepd-n1: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-02T03:04:05 ***")
    'JOB 9 ON n1 CANCELLED AT 2026-01-02T03:04:05'
    """
    found = [m for m in _END_LINE.findall(log) if "DUE TO JOB REQUEUE" not in m]
    return found[-1].strip("* ") if found else ""


def describe_end(job_id: str, state: SlurmState | None, log: str = "") -> str:
    """What to say about a job that ended without writing its result."""
    if state is None:
        what = (
            f"SLURM job {job_id} is no longer known to squeue or sacct (it ended and was "
            "purged from slurmctld, and the cluster keeps no accounting)"
        )
    else:
        what = f"SLURM job {job_id} ended {state.state}"
        if state.state == "CANCELLED" and state.reason.startswith("by"):
            what += f" ({state.reason}: scancel, or an administrator)"
    line = slurm_end_line(log)
    return what + (f"; its log says {line!r}" if line else "")
