"""The callable a sweep submits: runs its cells one after another as ``icl-lens run``.

Each cell is an ordinary ``icl-lens run`` directory (``DIR/cells/<name>``), run by
``icl-lens run``'s own parser and function, so it resumes from its checkpoints like any
run. Next to its results the worker keeps ``sweep-cell.json``: ``state`` (running, done
or failed), the attempt, the job, the inputs it ran on (:mod:`icl_lens.sweep.inputs`)
and the error of a failed cell. A cell is done when its status says so and its
``results.json`` is there (:func:`is_done`): done cells are skipped, a cell whose
results went missing runs again; a failing cell is recorded and the worker goes on with
the next. While it runs, the worker holds a lock under ``DIR/locks`` (the sweep's
guard, :mod:`icl_lens.sweep.guard`, sees it however the worker was started).

Cells that name the same model (and device, dtype, placement) reuse one loaded model:
the sweep hands a worker its cells sorted by model, so each is loaded once per worker.
``compare`` never modifies the model it is given (FT trains a copy).

The worker is :class:`submitit.helpers.Checkpointable`: on preemption or timeout submitit
requeues it with the same cells, and it continues where it stopped.

>>> SweepWorker()(root, [cell.to_dict() for cell in grid.cells])   # doctest: +SKIP
[{'cell': '...', 'state': 'done', ...}, ...]
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import time
import traceback
from pathlib import Path

import submitit

from icl_lens.sweep.grid import Cell, _options, run_parser
from icl_lens.sweep.guard import hold_worker
from icl_lens.sweep.status import (
    STATUS_FILE,
    cell_directory,
    cell_state,
    is_done,
    read_status,
    write_status,
)

__all__ = [
    "STATUS_FILE",
    "SweepWorker",
    "cell_directory",
    "cell_state",
    "is_done",
    "read_status",
    "write_status",
]


TIMED_OUT = (
    "the job reached its time limit (timeout_min of the grid's [local] or [slurm] table) "
    "once more than max_num_timeout allows requeueing it; raise timeout_min or "
    "max_num_timeout and run the same command again: the cell resumes from its checkpoints"
)


def _job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # not inside a submitit job
        return None


def _model_key(args) -> str:
    placement = [args.device, args.dtype, args.device_map, args.n_devices]
    return json.dumps([args.model, args.tokenizer, *placement])


class _Models:
    """The last loaded model, kept while consecutive cells name it."""

    def __init__(self):
        self.key, self.model = None, None

    def get(self, args):
        from icl_lens.cli.run import load_run_model

        key = _model_key(args)
        if key != self.key:
            self.key, self.model = None, None
            gc.collect()
            _empty_cuda_cache()
            self.model, self.key = load_run_model(args), key
        return self.model


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SweepWorker(submitit.helpers.Checkpointable):
    """Run ``cells`` (dicts of :meth:`Cell.to_dict`) under ``root``; returns one outcome
    per cell: ``{"cell", "name", "state", "error"}``."""

    def __call__(self, root: str, cells: list[dict], quiet: bool = False) -> list[dict]:
        parser = run_parser()
        options = _options(parser)
        models = _Models()
        outcomes = []
        with hold_worker(Path(root), _job_id()):
            for i, data in enumerate(cells, 1):
                cell = Cell.from_dict(data)
                outcome = self.run_cell(
                    Path(root), cell, parser, options, models, quiet, data.get("inputs")
                )
                outcomes.append(outcome)
                print(f"[sweep] {i}/{len(cells)} {cell.name}: {outcome['state']}", flush=True)
        return outcomes

    @staticmethod
    def run_cell(
        root: Path, cell: Cell, parser, options, models: _Models, quiet: bool, inputs=None
    ) -> dict:
        from icl_lens.cli import run as run_cli

        directory = cell_directory(root, cell)
        status = read_status(directory)
        outcome = {"cell": cell.id, "name": cell.name, "state": "done", "error": None}
        if is_done(directory, status):
            return outcome | {"skipped": True}
        directory.mkdir(parents=True, exist_ok=True)
        finished = len(list((directory / "checkpoints").glob("*.pt")))
        status = {
            "state": "running",
            "cell": cell.id,
            "grid": cell.grid,
            "attempt": status.get("attempt", 0) + 1,
            "job_id": _job_id(),
            "host": socket.gethostname(),
            "started": time.time(),
            "resumed_stages": finished,
            "inputs": inputs or status.get("inputs"),
        }
        write_status(directory, status)
        print(
            f"[sweep] {cell.name}: attempt {status['attempt']}"
            + (f", resuming from {finished} finished stages" if finished else ""),
            flush=True,
        )
        argv = cell.argv(directory, options)[1:] + (["--quiet"] if quiet else [])
        try:
            args = parser.parse_args(argv)
            code = run_cli.run(args, model=models.get(args))
            if code:
                raise RuntimeError(f"icl-lens run exited with {code}")
        except Exception as err:  # recorded; the next cell goes on (SystemExit passes)
            timed_out = isinstance(err, submitit.core.utils.UncompletedJobError)
            status |= {
                "state": "failed",
                "finished": time.time(),
                "error": TIMED_OUT if timed_out else f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:],
            }
            write_status(directory, status)
            print(f"[sweep] {cell.name}: failed: {status['error']}", file=sys.stderr, flush=True)
            if timed_out:  # submitit ends the job: its time is up
                raise
            return outcome | {"state": "failed", "error": status["error"]}
        write_status(directory, status | {"state": "done", "finished": time.time()})
        return outcome
