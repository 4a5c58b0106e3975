"""``icl-lens sweep --executor slurm`` on a real one-node SLURM cluster (conftest.py):
the same values as local workers, the options users set reaching sbatch, a requeue
(as a preemption does it) and a time limit survived mid-cell, a cancelled job recorded
and rerun, a second sweep refused while jobs of the first are queued or running, and
the report. No cell is lost or computed twice: each test checks the attempts.

Values are compared exactly: every worker runs on one CPU thread (OMP_NUM_THREADS=1, as
tests/conftest.py sets this process), so summation order, and so every bit, is the same
wherever a cell runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icl_lens.cli import main
from icl_lens.sweep import launch
from icl_lens.sweep.grid import Grid, GridError
from icl_lens.sweep.guard import active_jobs
from icl_lens.sweep.launch import sweep
from icl_lens.sweep.status import read_status
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task
from tests.test_sweep import write_grid

FAST = {"template": TEMPLATE, "max_queries": 6, "kendall_queries": 4}
FAST |= {"lr_grid": "1e-1", "control": False, "retest": False}
# a cell of ~60 learning-rate stages (~15 s on two free cores): long enough that a
# requeue or cancel at its first checkpoint lands mid-cell (SLURM's KillWait is 5 s)
LONG_LRS = ",".join(f"{lr:.3g}" for lr in np.geomspace(1e-4, 1e-1, 60))
LONG = {"template": TEMPLATE, "shots": 16, "max_queries": 300, "kendall_queries": 4}
LONG |= {"lr_extend": 0, "control": False, "retest": False}
SLURM = {"timeout_min": 30}
CLI = "import sys; from icl_lens.cli.main import main; sys.exit(main(sys.argv[1:]))"
OPTIONS = {  # each differs from what the job would get without it
    "partition": "sweeps",  # the cluster's default partition is "debug"
    "timeout_min": 7,  # submitit's default is 5
    "mem_gb": 2,  # default: DefMemPerCPU = 1024 MB a CPU
    "cpus_per_task": 2,  # default 1
    "name": "icl-lens-tier",  # default icl-lens-sweep
    "array_parallelism": 3,  # default: every task of the array at once (4)
}


@pytest.fixture(autouse=True)
def _fast_polls_one_thread(monkeypatch):
    monkeypatch.setitem(launch.POLL_S, "slurm", 0.5)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # sbatch passes the environment on


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-files")
    make_hf_model("gpt2").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    small = write_task(root / "small.jsonl")
    big = write_task(root / "big.jsonl", n_train=64, n_val=300)
    return {"model": str(root / "model"), "small": str(small), "big": str(big)}


def fast_grid(files, grid, slurm=None) -> dict:
    run = {"model": files["model"], "task": files["small"], **FAST}
    return {"run": run, "grid": grid, "slurm": slurm or SLURM}


def long_grid(files, lr_grids, slurm=None) -> dict:
    """Cells on the big task: lr_grids picks LONG_LRS ("long") and/or "1e-1"."""
    run = {"model": files["model"], "task": files["big"], **LONG}
    values = [LONG_LRS if g == "long" else g for g in lr_grids]
    return {"run": run, "grid": {"lr_grid": values}, "slurm": slurm or SLURM}


def in_thread(target):
    """``target()`` in a daemon thread; the box gets its result or its error."""
    box: dict = {}

    def run():
        try:
            box["result"] = target()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def finish(thread, box, timeout: float = 480):
    thread.join(timeout)
    assert not thread.is_alive(), "the sweep command did not return"
    assert "error" not in box, box.get("error")
    return box["result"]


def wait_for(predicate, what: str, timeout: float = 240, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def mid_cell(out: Path, attempt: int = 1) -> Path | None:
    """A cell of ``out`` running its ``attempt`` with a finished stage behind it."""
    for ckpt in out.glob("cells/*/checkpoints/*.pt"):
        status = read_status(ckpt.parent.parent)
        if status["state"] == "running" and status.get("attempt") == attempt:
            return ckpt.parent.parent
    return None


def jobs_of(out: Path) -> list[str]:
    return [j["job_id"] for j in json.loads((out / "jobs.json").read_text())["jobs"]]


def worker_pid(out: Path, job_id: str) -> int | None:
    """The process of ``job_id``'s worker, from the lock file it holds under out/locks."""
    for path in (out / "locks").glob("*.json"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info["job_id"] == job_id and info["host"] == socket.gethostname():
            if Path(f"/proc/{info['pid']}").exists():
                return info["pid"]
    return None


def summary_rows(out: Path, cells) -> pd.DataFrame:
    summary = pd.read_parquet(out / "summary.parquet")
    return summary[summary["cell"].isin({c.id for c in cells})].reset_index(drop=True)


def assert_same_values(out: Path, reference: Path, cells) -> None:
    pd.testing.assert_frame_equal(
        summary_rows(out, cells), summary_rows(reference, cells), check_exact=True
    )


# ---- a 4-cell grid on SLURM and on local workers ------------------------------------------


@pytest.fixture(scope="module")
def four_cells(slurm_cluster, files, tmp_path_factory):
    """The 2x2 grid through `icl-lens sweep` on SLURM (with OPTIONS) and on local workers."""
    root = tmp_path_factory.mktemp("four")
    data = fast_grid(files, {"shots": [2, 3], "seed": [1, 2]}, OPTIONS)
    path = write_grid(root / "grid.toml", data)
    with pytest.MonkeyPatch.context() as m:
        m.setitem(launch.POLL_S, "slurm", 0.5)
        m.setenv("OMP_NUM_THREADS", "1")
        codes = {}
        for executor in ("slurm", "local"):
            out = str(root / executor)
            argv = ["sweep", str(path), "--out", out, "--executor", executor, "--quiet"]
            codes[executor] = main(argv)
    return root, Grid.from_dict(data), codes


def test_a_grid_on_slurm_equals_the_grid_on_local_workers(four_cells, slurm_cluster):
    root, grid, codes = four_cells
    assert codes == {"slurm": 0, "local": 0}
    out = root / "slurm"
    record = json.loads((out / "jobs.json").read_text())
    assert record["executor"] == "slurm" and len(record["jobs"]) == 4  # one job a cell
    for job in record["jobs"]:
        (cell_id,) = job["cells"]
        (cell,) = [c for c in grid.cells if c.id == cell_id]
        status = read_status(out / "cells" / cell.name)
        assert status["job_id"] == job["job_id"] and status["attempt"] == 1
        assert slurm_cluster.job(job["job_id"])["JobState"] == "COMPLETED"
    for executor in ("slurm", "local"):
        assert json.loads((root / executor / "failures.json").read_text()) == []
    for table in ("summary.parquet", "aggregate.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / table), pd.read_parquet(root / "local" / table), check_exact=True
        )


def test_the_options_users_set_reach_sbatch(four_cells, slurm_cluster):
    """Read back from `scontrol show job`: every option of the grid's [slurm] table."""
    root, _, _ = four_cells
    for job_id in jobs_of(root / "slurm"):
        job = slurm_cluster.job(job_id)
        assert job["Partition"] == "sweeps"
        assert job["TimeLimit"] == "00:07:00"
        assert job["MinMemoryNode"] == "2G"
        assert job["CPUs/Task"] == "2"
        assert job["JobName"] == "icl-lens-tier"
        assert job["ArrayTaskThrottle"] == "3"


def test_report_on_a_slurm_sweep(four_cells, tmp_path):
    root, _, _ = four_cells
    page = tmp_path / "report.html"
    assert main(["report", str(root / "slurm"), "--out", str(page)]) == 0
    html = page.read_text()
    assert "4 cells, 4 done" in html and "not finished" not in html
    for title in ("ZSL acc.", "ICL acc.", "FT acc.", "SimAOU", "SimAM", "Kendall"):
        assert f"<th>{title}</th>" in html


# ---- requeued, timed out, cancelled: resumed to the uninterrupted values ------------------


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The long and the short cell, uninterrupted, in this process (debug executor)."""
    out = tmp_path_factory.mktemp("reference")
    result = sweep(
        Grid.from_dict(long_grid(files, ["long", "1e-1"])),
        out,
        executor="debug",
        quiet=True,
        log=None,
    )
    assert result.failed == []
    return out


def test_a_job_requeued_mid_cell_resumes_to_the_same_values(
    slurm_cluster, files, reference, tmp_path
):
    """`scontrol requeue`, as a preemption with PreemptMode=REQUEUE does: SLURM kills the
    job (SIGTERM, then SIGKILL) and queues it again; the cell resumes from its
    checkpoints and ends with the values of the uninterrupted run."""
    out = tmp_path / "out"
    grid = Grid.from_dict(long_grid(files, ["long"]))
    thread, box = in_thread(lambda: sweep(grid, out, executor="slurm", quiet=True, log=None))
    cell_dir = wait_for(lambda: mid_cell(out), "the cell's first checkpoint")
    (job_id,) = jobs_of(out)
    slurm_cluster.run("scontrol", "requeue", job_id)
    result = finish(thread, box)
    assert result.failed == [] and result.done == [grid.cells[0].id]
    status = read_status(cell_dir)
    assert status["attempt"] == 2 and status["resumed_stages"] >= 1
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    log = (out / "logs" / f"{job_id}_0_log.out").read_text()
    assert "DUE TO JOB REQUEUE" in log and "resuming from" in log
    assert_same_values(out, reference, grid.cells)


def _signalled(pid: int) -> bool:
    """Whether the held process ``pid`` got USR2: pending, or delivered (slurmstepd
    continues a stopped task to signal it; the worker then requeues and exits)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return True
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    if not fields["State"].strip().startswith("T"):
        return True
    masks = [int(fields[k], 16) for k in ("SigPnd", "ShdPnd")]
    return any(mask >> (signal.SIGUSR2 - 1) & 1 for mask in masks)


def test_a_job_at_its_time_limit_is_requeued_by_submitit_and_finishes(
    slurm_cluster, files, reference, tmp_path
):
    """timeout_min = 2 and signal_delay_s = 60: SLURM signals the worker (USR2) 60 s
    before the limit, submitit checkpoints and requeues the job (`scontrol requeue`,
    one of max_num_timeout = 3 requeues used), and the cell resumes. The worker is held
    (SIGSTOP) from its first checkpoint until SLURM's signal is pending, as a cell
    slower than its time slot would be."""
    out = tmp_path / "out"
    limits = {"timeout_min": 2, "signal_delay_s": 60, "max_num_timeout": 3}
    grid = Grid.from_dict(long_grid(files, ["long"], limits))
    thread, box = in_thread(lambda: sweep(grid, out, executor="slurm", quiet=True, log=None))
    cell_dir = wait_for(lambda: mid_cell(out), "the cell's first checkpoint")
    (job_id,) = jobs_of(out)
    pid = wait_for(lambda: worker_pid(out, job_id), "the worker's lock")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _signalled(pid), "SLURM's time-limit signal", timeout=150, every=0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    result = finish(thread, box)
    assert result.failed == []
    status = read_status(cell_dir)
    # on a busy machine the resumed attempt can outlast its slot too: one more requeue
    assert status["attempt"] >= 2 and status["resumed_stages"] >= 1
    job = slurm_cluster.job(job_id)
    assert job["TimeLimit"] == "00:02:00" and int(job["Restarts"]) == status["attempt"] - 1
    log = (out / "logs" / f"{job_id}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log
    for used in range(1, status["attempt"]):  # each requeue counts down max_num_timeout
        assert f"Requeued job {job_id} ({3 - used} remaining timeouts)" in log
    assert_same_values(out, reference, grid.cells)


def test_a_cancelled_job_is_recorded_with_slurms_reason_and_a_rerun_completes_it(
    slurm_cluster, files, reference, tmp_path, capsys
):
    """scancel of the array while its first task runs a cell (the second, which needs
    every CPU of the node too, still queued): both cells land in failures.json with the
    state SLURM gives, the sweep ends (it waited forever where sacct keeps no accounting),
    and the same command again resumes the first cell and runs the second."""
    out = tmp_path / "out"
    whole_node = {**SLURM, "cpus_per_task": slurm_cluster.cpus}
    data = long_grid(files, ["long", "1e-1"], whole_node)
    grid = Grid.from_dict(data)
    long_cell, short_cell = grid.cells
    thread, box = in_thread(lambda: sweep(grid, out, executor="slurm", quiet=True, log=None))
    cell_dir = wait_for(lambda: mid_cell(out), "the first cell's first checkpoint")
    assert cell_dir.name == long_cell.name
    first, second = jobs_of(out)
    assert slurm_cluster.job(second)["JobState"] == "PENDING"
    slurm_cluster.run("scancel", first.split("_")[0])  # the whole array
    result = finish(thread, box, timeout=120)
    failed = {f["cell"]: f for f in result.failed}
    assert failed.keys() == {long_cell.id, short_cell.id}
    assert json.loads((out / "failures.json").read_text()) == result.failed
    running, queued = failed[long_cell.id], failed[short_cell.id]
    assert running["error"].startswith(
        f"the cell stopped mid-run: its job ended: SLURM job {first} ended CANCELLED"
    )
    assert "CANCELLED AT" in running["error"]  # slurmstepd's line in the job's log
    assert queued["error"] == (
        f"the cell was never started: its job ended: SLURM job {second} ended CANCELLED"
    )
    assert running["attempts"] == 1 and queued["attempts"] == 0
    path = write_grid(tmp_path / "grid.toml", data)
    argv = ["sweep", str(path), "--out", str(out), "--executor", "slurm", "--quiet"]
    assert main(argv) == 0
    assert "2 of 2 cells done" in capsys.readouterr().out
    assert json.loads((out / "failures.json").read_text()) == []
    resumed = read_status(cell_dir)
    assert resumed["attempt"] == 2 and resumed["resumed_stages"] >= 1
    assert read_status(out / "cells" / short_cell.name)["attempt"] == 1
    assert_same_values(out, reference, grid.cells)


# ---- one sweep of a directory at a time ---------------------------------------------------


def refused(argv, capsys) -> str:
    """The one-line error of a sweep command that must be refused."""
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    return error


def test_a_second_sweep_is_refused_while_jobs_of_the_first_are_queued_or_running(
    slurm_cluster, files, tmp_path, capsys
):
    """The first sweep command is killed (a lost login session) while its first job runs
    (held by SIGSTOP, so that it cannot end meanwhile) and its second is queued: a second
    sweep of the same --out submits nothing and names both. Once the first job ended,
    the second, held in the queue (`scontrol uhold`), still blocks with no worker
    running anywhere. Once it ran too, the same command collects both cells: each
    computed once."""
    out = tmp_path / "out"
    whole_node = {**SLURM, "cpus_per_task": slurm_cluster.cpus}  # one job at a time
    data = fast_grid(files, {"shots": [2], "seed": [1, 2]}, whole_node)
    path = write_grid(tmp_path / "grid.toml", data)
    argv = ["sweep", str(path), "--out", str(out), "--executor", "slurm", "--quiet"]
    log = tmp_path / "first.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=sink, stderr=sink)

    def submitted() -> bool:
        assert first.poll() is None, f"the first sweep exited: {log.read_text()}"
        return (out / "jobs.json").exists()

    try:
        wait_for(submitted, "the jobs to be submitted")
        jobs = jobs_of(out)
        pid, running = wait_for(
            lambda: next(((p, j) for j in jobs if (p := worker_pid(out, j))), None),
            "a worker to start",
        )
        os.kill(pid, signal.SIGSTOP)
    finally:
        first.kill()
        first.wait()
    (queued,) = set(jobs) - {running}
    try:
        error = refused(argv, capsys)
        assert f"worker pid {pid} on {socket.gethostname()}, job {running}" in error
        assert f"SLURM job {running} (running)" in error
        assert f"SLURM job {queued} (pending: Resources)" in error
        assert "of an earlier sweep" in error
        slurm_cluster.run("scontrol", "uhold", queued)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: running not in slurm_cluster.queue(), "the running job to end")
    assert refused(argv, capsys).startswith(
        f"icl-lens sweep: error: SLURM job {queued} (pending: JobHeldUser) of an earlier sweep"
    )
    assert sorted(slurm_cluster.queue()) == [queued] and jobs_of(out) == jobs  # nothing new
    slurm_cluster.run("scontrol", "release", queued)
    wait_for(lambda: queued not in slurm_cluster.queue(), "the queued job to end")
    assert main(argv) == 0
    assert "2 of 2 cells done" in capsys.readouterr().out
    assert jobs_of(out) == jobs  # the rerun submitted nothing
    for cell in Grid.from_dict(data).cells:
        assert read_status(out / "cells" / cell.name)["attempt"] == 1


def test_a_slurm_that_cannot_be_asked_blocks_and_a_purged_job_does_not(
    slurm_cluster, tmp_path, monkeypatch
):
    """jobs.json names a SLURM job. squeue against a controller that does not answer
    (this cluster's config with a closed port) fails for real: the sweep is refused,
    saying so, as a job of the earlier sweep could still run. A job id SLURM no longer
    knows (purged) has ended and blocks nothing."""
    record = {"executor": "slurm", "jobs": [{"job_id": "987654_0", "cells": []}]}
    (tmp_path / "jobs.json").write_text(json.dumps(record))
    assert active_jobs(tmp_path) == []
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.unreachable(tmp_path / "dead.conf")))
    with pytest.raises(GridError) as err:
        active_jobs(tmp_path)
    message = str(err.value)
    assert message.startswith(
        f"cannot tell whether the SLURM jobs of an earlier sweep of {tmp_path} still run"
    )
    assert "Unable to contact slurm controller" in message
    assert f"if none of the jobs in {tmp_path / 'jobs.json'} can run any more" in message
