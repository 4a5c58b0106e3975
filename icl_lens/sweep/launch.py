"""Run a grid's cells through submitit and collect what they left behind.

:func:`sweep` writes ``DIR/sweep.json`` (the grid and its cells), submits the cells that
are not done to workers (:class:`icl_lens.sweep.worker.SweepWorker`), follows them cell by
cell, then writes ``DIR/failures.json`` (every cell that did not finish, with its error
and log) and the tables (:mod:`icl_lens.sweep.tables`).

Executors (submitit's): ``debug`` runs the workers in this process, ``local`` in
subprocesses on this machine, ``slurm`` as a job array. ``max_parallel`` workers run at
once; the cells are split between them sorted by model, so that a worker loads each of
its models once. On SLURM without ``max_parallel`` every cell is its own job.

>>> result = sweep(Grid.from_toml("grid.toml"), "runs/study", executor="local")  # doctest: +SKIP
>>> result.failed                                                              # doctest: +SKIP
[]
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from icl_lens.files import atomic_write_text
from icl_lens.sweep.grid import SLURM_GENERIC, Cell, Grid, GridError
from icl_lens.sweep.tables import write_tables
from icl_lens.sweep.worker import SweepWorker, cell_directory, read_status

__all__ = ["EXECUTORS", "SweepResult", "active_jobs", "make_executor", "plan_jobs", "sweep"]

EXECUTORS = ("debug", "local", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
"""submitit's LocalExecutor times a job out after 2 minutes unless told otherwise."""
POLL_S = {"debug": 0.0, "local": 0.5, "slurm": 20.0}
ACTIVE_SLURM = {"RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING"}


@dataclass
class SweepResult:
    """What a sweep left: the cells done (ids), those that failed (failures.json entries),
    how many were done before it started, and the tables."""

    directory: Path
    done: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    already_done: int = 0
    tables: tuple[Path, Path] | None = None


def _model_order(cell: Cell) -> str:
    keys = ("model", "tokenizer", "device", "dtype", "device_map", "n_devices")
    return json.dumps([cell.settings.get(k) for k in keys], sort_keys=True, default=str)


def plan_jobs(cells: Sequence[Cell], n_jobs: int) -> list[list[Cell]]:
    """``cells`` split into at most ``n_jobs`` near-equal runs, sorted by model (stable),
    so cells of one model share a worker where the split allows.

    >>> from icl_lens.sweep.grid import Cell
    >>> cells = [Cell({"model": m, "seed": s}, {"model": m, "seed": s})
    ...          for s in (1, 2) for m in ("a", "b")]
    >>> [[c.grid["model"] for c in job] for job in plan_jobs(cells, 2)]
    [['a', 'a'], ['b', 'b']]
    """
    ordered = sorted(cells, key=_model_order)
    n_jobs = max(1, min(n_jobs, len(ordered)))
    size = math.ceil(len(ordered) / n_jobs) if ordered else 0
    return [ordered[i : i + size] for i in range(0, len(ordered), size)] if size else []


def make_executor(kind: str, folder: Path, grid: Grid, max_parallel: int | None):
    """A submitit executor of ``kind`` writing its logs under ``folder``: ``debug`` and
    ``local`` are submitit's DebugExecutor and LocalExecutor (with the grid's [local]
    table), ``slurm`` its AutoExecutor on SLURM (with the [slurm] table: the generic
    names timeout_min, mem_gb, gpus_per_node, cpus_per_task, name, and SLURM's own)."""
    import submitit

    if kind not in EXECUTORS:
        raise GridError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    table = dict(grid.local if kind == "local" else grid.slurm)
    retries = table.pop("max_num_timeout", 3)
    params: dict[str, Any] = {"name": "icl-lens-sweep", "stderr_to_stdout": True}
    if kind == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=retries)
        params |= {"timeout_min": LOCAL_TIMEOUT_MIN, **_local_gpus(), **table}
    else:
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=retries)
        params["slurm_stderr_to_stdout"] = params.pop("stderr_to_stdout")
        for key, value in table.items():
            params[key if key in SLURM_GENERIC else f"slurm_{key}"] = value
        if max_parallel:
            params["slurm_array_parallelism"] = max_parallel
    executor.update_parameters(**params)
    return executor


def _local_gpus() -> dict[str, Any]:
    """Local workers see the GPUs this process sees: submitit's LocalExecutor sets
    ``CUDA_VISIBLE_DEVICES`` to its first ``gpus_per_node`` devices (none by default)."""
    import torch

    n = torch.cuda.device_count()
    if not n:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(x) for x in visible.split(",") if x.strip().isdigit()]
    out: dict[str, Any] = {"gpus_per_node": n}
    if len(ids) == n:
        out["visible_gpus"] = tuple(ids)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def active_jobs(root: str | Path) -> list[str]:
    """Jobs of an earlier sweep of ``root`` that still run (from ``DIR/jobs.json``): a
    local job's process alive, a SLURM job pending or running."""
    path = Path(root) / "jobs.json"
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    active = []
    for job in record.get("jobs", []):
        job_id = str(job["job_id"])
        if record.get("executor") == "local":
            if job_id.isdigit() and _alive(int(job_id)):
                active.append(job_id)
        elif record.get("executor") == "slurm":
            import submitit

            try:
                state = submitit.SlurmJob(Path(root) / "logs", job_id).state
            except Exception:  # no SLURM here (a copied directory): nothing can still run
                continue
            if state.split()[0] in ACTIVE_SLURM:
                active.append(job_id)
    return active


def _log_path(job) -> str | None:
    try:
        return str(job.paths.stdout)
    except Exception:  # debug jobs log nowhere in particular
        return None


def _failure(cell: Cell, root: Path, status: dict, job=None) -> dict[str, Any]:
    error = status.get("error")
    if error is None:
        reason = "was never started" if status["state"] == "pending" else "stopped mid-run"
        detail = ""
        if job is not None:
            exc = job.exception()
            detail = f": {' '.join(str(exc).strip().splitlines()[:2])}" if exc else ""
        error = f"the cell {reason}: its job ended{detail}"
    return {
        "cell": cell.id,
        "name": cell.name,
        "directory": str(cell_directory(root, cell)),
        "grid": cell.grid,
        "error": error,
        "traceback": status.get("traceback"),
        "attempts": status.get("attempt", 0),
        "job_id": status.get("job_id"),
        "log": _log_path(job) if job is not None else None,
    }


def sweep(
    grid: Grid,
    out: str | Path,
    *,
    executor: str = "local",
    max_parallel: int | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = print,
) -> SweepResult:
    """Run every cell of ``grid`` that is not done under ``out`` and write the tables.

    A rerun skips done cells and resumes the others from their checkpoints. Cells that
    fail are listed in ``out/failures.json`` (and :attr:`SweepResult.failed`).
    """
    root = Path(out)
    if max_parallel is not None and max_parallel < 1:
        raise GridError(f"--max-parallel must be >= 1, got {max_parallel}")
    running = active_jobs(root)
    if running:
        raise GridError(
            f"jobs {', '.join(running)} of an earlier sweep of {root} are still running: once "
            "they end (or are cancelled), run the same command again"
        )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "sweep.json", json.dumps(grid.to_dict(), indent=2) + "\n")
    statuses = {c.id: read_status(cell_directory(root, c)) for c in grid.cells}
    todo = [c for c in grid.cells if statuses[c.id]["state"] != "done"]
    result = SweepResult(root, already_done=len(grid.cells) - len(todo))
    say = log or (lambda _: None)
    say(
        f"{len(grid.cells)} cells: {result.already_done} done already, {len(todo)} to run "
        f"({executor} executor); logs in {root / 'logs'}"
    )
    job_of: dict[str, Any] = {}
    if todo:
        n_jobs = max_parallel or (len(todo) if executor == "slurm" else 1)
        plan = plan_jobs(todo, n_jobs)
        ex = make_executor(executor, root / "logs", grid, max_parallel)
        with ex.batch():
            jobs = [
                ex.submit(SweepWorker(), str(root), [c.to_dict() for c in cells], quiet)
                for cells in plan
            ]
        for job, cells in zip(jobs, plan, strict=True):
            job_of |= {c.id: job for c in cells}
        record = {
            "executor": executor,
            "jobs": [
                {"job_id": str(j.job_id), "cells": [c.id for c in cells]}
                for j, cells in zip(jobs, plan, strict=True)
            ],
        }
        atomic_write_text(root / "jobs.json", json.dumps(record, indent=2) + "\n")
        _follow(root, todo, jobs, executor, quiet, say)
    for cell in grid.cells:
        status = read_status(cell_directory(root, cell))
        if status["state"] == "done":
            result.done.append(cell.id)
        else:
            result.failed.append(_failure(cell, root, status, job_of.get(cell.id)))
    atomic_write_text(root / "failures.json", json.dumps(result.failed, indent=2) + "\n")
    result.tables = write_tables(root, grid.cells)
    return result


def _follow(root: Path, cells: list[Cell], jobs: list, executor: str, quiet: bool, say) -> None:
    """Wait for ``jobs``, reporting each cell as it finishes."""
    left = {c.id: c for c in cells}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=quiet)

    def report() -> None:
        for cell_id, cell in list(left.items()):
            status = read_status(cell_directory(root, cell))
            if status["state"] in ("done", "failed"):
                left.pop(cell_id)
                bar.update(1)
                line = f"{status['state']}: {cell.name}"
                if status["state"] == "failed":
                    line += f" ({status.get('error')})"
                elif "started" in status and "finished" in status:
                    line += f" ({(status['finished'] - status['started']) / 60:.1f} min)"
                if not quiet:
                    bar.write(line)

    try:
        if executor == "debug":
            for job in jobs:  # runs here, now
                job.result()
                report()
        while not all(job.done() for job in jobs):
            report()
            time.sleep(POLL_S[executor])
        report()
    except KeyboardInterrupt:
        if executor == "local":
            for job in jobs:
                job.cancel(check=False)
        else:
            say(
                f"the {len(jobs)} submitted jobs keep running; once they end, run the same "
                "command again to collect them (finished cells are skipped)"
            )
        raise
    finally:
        bar.close()
