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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from icl_lens.errors import UserError
from icl_lens.files import atomic_write_text
from icl_lens.sweep.executors import (
    EXECUTORS,
    LOCAL_TIMEOUT_MIN,
    SLURM_TIMEOUT_MIN,
    make_executor,
    require_executor,
    timeout_note,
)
from icl_lens.sweep.grid import Cell, Grid, GridError
from icl_lens.sweep.guard import active_jobs, hold_sweep
from icl_lens.sweep.inputs import cell_inputs, changed_cells, record_unchecked, set_aside
from icl_lens.sweep.slurm import (
    SlurmQueryError,
    SlurmState,
    describe_end,
    job_states,
    slurm_end_line,
)
from icl_lens.sweep.status import cell_directory, is_done, read_status
from icl_lens.sweep.tables import write_tables
from icl_lens.sweep.worker import SweepWorker

__all__ = [
    "EXECUTORS",
    "LOCAL_TIMEOUT_MIN",
    "SweepResult",
    "active_jobs",
    "make_executor",
    "plan_jobs",
    "sweep",
]

POLL_S = {"debug": 0.0, "local": 0.5, "slurm": 20.0}


@dataclass
class SweepResult:
    """What a sweep left: the cells done (ids), those that failed (failures.json entries),
    how many were done before it started, the cells recomputed because their inputs
    changed (names), and the tables."""

    directory: Path
    done: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    already_done: int = 0
    recomputed: list[str] = field(default_factory=list)
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


def _log_path(job) -> str | None:
    try:
        return str(job.paths.stdout)
    except Exception:  # debug jobs log nowhere in particular
        return None


def _failure(cell: Cell, root: Path, status: dict, job=None, ended: str = "") -> dict:
    """The failures.json entry of ``cell``; ``ended`` says how its job ended (a cell
    that recorded no error of its own gets it)."""
    error = status.get("error")
    if error is None:
        reason = "was never started" if status["state"] == "pending" else "stopped mid-run"
        if status["state"] == "done":
            reason = "is marked done but its results.json is missing"
        error = f"the cell {reason}: its job ended{ended}"
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


def _changed_message(root: Path, grid: Grid, changed: dict[str, list[str]]) -> str:
    names = [c.name for c in grid.cells if c.id in changed]
    what = sorted({w for ws in changed.values() for w in ws})
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"{len(names)} cells under {root} were computed with other inputs than now "
        f"({'; '.join(what)} changed): {shown}; rerun with --recompute-changed to recompute "
        f"them (their directories move to {root / 'replaced'}), or restore the inputs"
    )


def _prepare(grid: Grid, root: Path, recompute_changed: bool, say) -> tuple[list[str], dict]:
    """Refuse (or set aside, when asked) cells computed with other inputs; returns the
    names of the cells set aside and every cell's inputs now."""
    inputs = cell_inputs(grid, root)
    changed, unchecked = changed_cells(grid, root, inputs)
    moved = []
    if changed and not recompute_changed:
        raise GridError(_changed_message(root, grid, changed))
    if changed:
        cells = [c for c in grid.cells if c.id in changed]
        set_aside(root, cells)
        moved = [c.name for c in cells]
        say(
            f"recomputing {len(cells)} cells whose inputs changed (old directories kept in "
            f"{root / 'replaced'}): "
            + ", ".join(f"{c.name} ({'; '.join(changed[c.id])})" for c in cells)
        )
    if unchecked:
        say(
            f"warning: {len(unchecked)} done cells recorded no model identity (run before "
            "icl-lens recorded one): their task data is checked, their model files cannot "
            "be; recorded now, so that a later change is caught"
        )
        record_unchecked(root, unchecked, inputs)
    return moved, inputs


def sweep(
    grid: Grid,
    out: str | Path,
    *,
    executor: str = "local",
    max_parallel: int | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = print,
    recompute_changed: bool = False,
) -> SweepResult:
    """Run every cell of ``grid`` that is not done under ``out`` and write the tables.

    A rerun skips done cells and resumes the others from their checkpoints. Cells done
    with other task data or model files than now are refused, or with
    ``recompute_changed`` set aside and run again. Cells that fail are listed in
    ``out/failures.json`` (and :attr:`SweepResult.failed`).
    """
    from icl_lens.cli.out_dir import check_output_directory

    root = Path(out)
    if max_parallel is not None and max_parallel < 1:
        raise GridError(f"--max-parallel must be >= 1, got {max_parallel}")
    require_executor(executor)
    try:
        check_output_directory(root)
    except UserError as err:
        raise GridError(str(err)) from None
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _: None)
    with hold_sweep(root):
        running = active_jobs(root, command=False)
        if running:
            raise GridError(
                f"{', '.join(running)} of an earlier sweep of {root} still running: once it "
                "ends (or is stopped), run the same command again"
            )
        moved, inputs = _prepare(grid, root, recompute_changed, say)
        atomic_write_text(root / "sweep.json", json.dumps(grid.to_dict(), indent=2) + "\n")
        todo = [c for c in grid.cells if not is_done(cell_directory(root, c))]
        result = SweepResult(root, already_done=len(grid.cells) - len(todo), recomputed=moved)
        say(
            f"{len(grid.cells)} cells: {result.already_done} done already, {len(todo)} to "
            f"run ({executor} executor); logs in {root / 'logs'}"
        )
        if executor == "slurm" and todo and not {"timeout_min", "time"} & set(grid.slurm):
            say(
                f"warning: [slurm] sets no timeout_min: submitit asks SLURM for "
                f"{SLURM_TIMEOUT_MIN} minutes a job (requeued at most max_num_timeout times)"
            )
        job_of: dict[str, Any] = {}
        ended: Callable[[Any], str] | None = None  # how a job ended, once submitted
        if todo:
            job_of, ended = _submit(grid, root, todo, inputs, executor, max_parallel, quiet, say)
        for cell in grid.cells:
            directory = cell_directory(root, cell)
            if is_done(directory):
                result.done.append(cell.id)
            else:
                job = job_of.get(cell.id)
                note = ended(job) if job is not None and ended else ""
                result.failed.append(_failure(cell, root, read_status(directory), job, note))
        atomic_write_text(root / "failures.json", json.dumps(result.failed, indent=2) + "\n")
        result.tables = write_tables(root, grid.cells)
    return result


def _submit(grid, root, todo, inputs, executor, max_parallel, quiet, say):
    """Submit ``todo`` to workers, record the jobs, follow them; returns the job of each
    cell and a function saying how a job ended (for the cells it left unfinished)."""
    n_jobs = max_parallel or (len(todo) if executor == "slurm" else 1)
    plan = plan_jobs(todo, n_jobs)
    ex = make_executor(executor, root / "logs", grid, max_parallel)
    with ex.batch():
        jobs = [
            ex.submit(
                SweepWorker(),
                str(root),
                [c.to_dict() | {"inputs": inputs[c.id]} for c in cells],
                quiet,
            )
            for cells in plan
        ]
    submitted = time.time()
    job_of = {c.id: job for job, cells in zip(jobs, plan, strict=True) for c in cells}
    record = {
        "executor": executor,
        "jobs": [
            {"job_id": str(j.job_id), "cells": [c.id for c in cells]}
            for j, cells in zip(jobs, plan, strict=True)
        ],
    }
    atomic_write_text(root / "jobs.json", json.dumps(record, indent=2) + "\n")
    ended, states = _follow(root, todo, jobs, executor, quiet, say)
    notes: dict[str, str] = {}

    def how_it_ended(job) -> str:
        key = str(job.job_id)
        if key not in notes:
            ran = ended.get(key, time.time()) - submitted
            notes[key] = _end_note(job, executor, grid, states.get(key), ran)
        return notes[key]

    return job_of, how_it_ended


def _end_note(job, executor: str, grid: Grid, state: SlurmState | None, ran_s: float) -> str:
    """``": <how the job ended>[; <the time limit and the keys to raise>]"``, or ''."""
    log = _log_text(job)
    if executor == "slurm" and not job.paths.result_pickle.exists():
        # killed before it could write its result (scancel, time limit, node failure):
        # what SLURM says, not job.exception(), which would wait for sacct
        detail = describe_end(str(job.job_id), state, log)
        ran_out = state is not None and state.state == "TIMEOUT"
        ran_out = ran_out or "TIME LIMIT" in slurm_end_line(log)
    else:
        exc = job.exception()
        detail = " ".join(str(exc).strip().splitlines()[:2]) if exc else ""
        if executor == "slurm":
            ran_out = "timed-out too many times" in log
        else:
            table = grid.local
            limit = 60 * table.get("timeout_min", LOCAL_TIMEOUT_MIN)
            ran_out = executor == "local" and ("timed-out" in log or ran_s >= limit)
    note = f": {detail}" if detail else ""
    return note + (f"; {timeout_note(executor, grid)}" if ran_out else "")


def _log_text(job) -> str:
    path = _log_path(job)
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def _slurm_ended(jobs: list, ended: dict, states: dict, say) -> None:
    """Mark the SLURM jobs that ended: their result is written, or SLURM lists them in a
    final state, or no longer at all (submitit's job.done() asks sacct, which a cluster
    without accounting cannot answer: a cancelled job would be followed forever)."""
    left = [job for job in jobs if str(job.job_id) not in ended]
    try:
        known = job_states([str(job.job_id) for job in left])
    except SlurmQueryError as err:
        say(f"warning: {err}; asking again in {POLL_S['slurm']:g} s")
        return
    for job in left:
        key = str(job.job_id)
        state = states[key] = known.get(key)
        if job.paths.result_pickle.exists() or state is None or state.ended:
            ended[key] = time.time()


def _follow(root: Path, cells: list[Cell], jobs: list, executor: str, quiet: bool, say):
    """Wait for ``jobs``, reporting each cell as it finishes; returns when each job was
    first seen finished and, on SLURM, each job's last state (job id -> each)."""
    left = {c.id: c for c in cells}
    ended: dict[str, float] = {}
    states: dict[str, SlurmState | None] = {}
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=quiet)

    def report() -> None:
        for cell_id, cell in list(left.items()):
            status = read_status(cell_directory(root, cell))
            if status["state"] == "failed" or is_done(cell_directory(root, cell), status):
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
        while True:
            if executor == "slurm":
                _slurm_ended(jobs, ended, states, say)
            for job in jobs:
                if executor != "slurm" and str(job.job_id) not in ended and job.done():
                    ended[str(job.job_id)] = time.time()
            if len(ended) == len(jobs):
                break
            report()
            time.sleep(POLL_S[executor])
        report()
        return ended, states
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
