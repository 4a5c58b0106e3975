"""A cell's state on disk: ``DIR/cells/<name>/sweep-cell.json`` (written by the worker)
and its ``results.json`` (written by the cell's ``icl-lens run``). Reading them needs
no submitit, so ``icl-lens report`` reads a sweep anywhere.

>>> import tempfile
>>> read_status(tempfile.mkdtemp())
{'state': 'pending'}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from icl_lens.files import atomic_write_text
from icl_lens.sweep.grid import Cell

__all__ = ["STATUS_FILE", "cell_directory", "cell_state", "is_done", "read_status", "write_status"]

STATUS_FILE = "sweep-cell.json"


def cell_directory(root: str | Path, cell: Cell) -> Path:
    return Path(root) / "cells" / cell.name


def read_status(directory: str | Path) -> dict[str, Any]:
    """A cell's ``sweep-cell.json`` (``{"state": "pending"}`` before its first start)."""
    path = Path(directory) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or damaged: the cell runs (again)
        return {"state": "pending"}
    return status if isinstance(status, dict) and "state" in status else {"state": "pending"}


def is_done(directory: str | Path, status: dict[str, Any] | None = None) -> bool:
    """Done: the status says so and the results are there."""
    status = read_status(directory) if status is None else status
    return status["state"] == "done" and (Path(directory) / "results.json").is_file()


def cell_state(directory: str | Path) -> str:
    """pending, running, done or failed; a done cell without ``results.json`` is
    pending (it runs again)."""
    status = read_status(directory)
    if status["state"] == "done" and not is_done(directory, status):
        return "pending"
    return status["state"]


def write_status(directory: Path, status: dict[str, Any]) -> None:
    atomic_write_text(directory / STATUS_FILE, json.dumps(status, indent=2) + "\n")
