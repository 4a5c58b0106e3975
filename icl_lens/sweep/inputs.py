"""What a cell's results depend on besides its settings: the task's examples and the
model's files. A cell is reused by its settings only while both are what they were.

- The task: :func:`~icl_lens.study.checkpoint.fingerprint_task` of the task loaded
  exactly as the cell loads it (the grid check loads each distinct task once), against
  the one the cell's own run recorded (``checkpoints/config.json``, the record ``icl-lens
  run`` checks on resume) or, before that exists, the cell's ``sweep-cell.json``.
- The model: :func:`~icl_lens.study.checkpoint.fingerprint_model` needs the model
  loaded, which the sweep command (on a login node, say) must not do for every model of
  a grid; the sweep identifies a model by the SHA-256 of its files instead (the model's
  path or GGUF chunks and ``tokenizer``; a hub name by the commit of its cached
  snapshot), hashed once per sweep and kept in ``DIR/inputs.json`` by path, size and
  modification time, so a rerun with unchanged files reads no byte of them. A worker
  records it in the cell's ``sweep-cell.json`` when the cell starts; the cell's run
  still refuses a model whose ``fingerprint_model`` changed under its checkpoints.

:func:`changed_cells` lists the cells computed with other inputs than now; the sweep
refuses them, or with ``recompute=True`` moves their directories to ``DIR/replaced/``
and runs them again.

>>> identity = model_identity({"model": "path/to/model"}, {})          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icl_lens.files import atomic_write_text
from icl_lens.sweep.grid import Cell, Grid
from icl_lens.sweep.status import cell_directory, read_status, write_status

__all__ = [
    "INPUTS_FILE",
    "cell_inputs",
    "changed_cells",
    "model_identity",
    "record_unchecked",
    "set_aside",
]

INPUTS_FILE = "inputs.json"


def _files(path: Path) -> list[Path]:
    """The files a model path stands for: itself, or every file under a directory
    (hidden ones, such as download caches, left out)."""
    if path.is_file():
        return [path]
    found = []
    for f in path.rglob("*"):
        parts = f.relative_to(path).parts
        if f.is_file() and not any(p.startswith(".") for p in parts):
            found.append(f)
    return sorted(found)


def _source_identity(source: str, cache: dict[str, Any]) -> str | None:
    """A model path's content hash (cached by its files' sizes and times), or a hub
    name's cached commit; None when neither is known here."""
    from icl_lens.model.gguf import _sha256

    path = Path(source)
    if not path.exists():
        return _hub_commit(source)
    files = _files(path)
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = str(path.resolve())
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    names = [str(f.relative_to(path)) for f in files] if path.is_dir() else []
    digest = hashlib.sha256(json.dumps(names).encode() + _sha256(files).encode()).hexdigest()
    cache[key] = {"stamp": stamp, "sha256": digest}
    return digest


def _hub_commit(name: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, local_files_only=True)
    except Exception:  # not a hub name, or not downloaded yet: nothing to compare
        return None
    return f"hub:{name}@{Path(folder).name}"


def model_identity(settings: Mapping[str, Any], cache: dict[str, Any]) -> str | None:
    """One identity for a cell's model and tokenizer files; None when unknown."""
    model = settings.get("model")
    sources = [model] if isinstance(model, str) else list(model or [])
    if settings.get("tokenizer"):
        sources.append(settings["tokenizer"])
    ids = [_source_identity(str(s), cache) for s in sources]
    if not ids or any(i is None for i in ids):
        return None
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _read_cache(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cell_inputs(grid: Grid, root: Path, *, save: bool = True) -> dict[str, dict[str, str | None]]:
    """Cell id -> ``{"task": fingerprint, "model": identity}`` now: each distinct model
    hashed once (or read from ``root/inputs.json``, which ``save`` updates), each
    distinct task loaded once."""
    if grid.cells and not grid.task_fingerprints:
        grid.check(check_tasks=True)
    cache = _read_cache(root)
    models: dict[str, str | None] = {}
    out = {}
    for cell in grid.cells:
        key = json.dumps([cell.settings.get("model"), cell.settings.get("tokenizer")])
        if key not in models:
            models[key] = model_identity(cell.settings, cache)
        out[cell.id] = {"task": grid.task_fingerprints.get(cell.id), "model": models[key]}
    if cache and save:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / INPUTS_FILE, json.dumps(cache, indent=1) + "\n")
    return out


def _run_record(directory: Path) -> dict[str, Any]:
    """The fingerprints the cell's own run recorded (``checkpoints/config.json``)."""
    try:
        config = json.loads((directory / "checkpoints" / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def changed_cells(
    grid: Grid, root: Path, inputs: Mapping[str, Mapping[str, str | None]]
) -> tuple[dict[str, list[str]], list[Cell]]:
    """Cells whose directory holds work done with other inputs than ``inputs``: cell id
    -> what changed; and the cells that recorded no model identity (run before the
    sweep recorded one), which cannot be checked for their model."""
    changed: dict[str, list[str]] = {}
    unchecked = []
    for cell in grid.cells:
        directory = cell_directory(root, cell)
        if not directory.is_dir():
            continue
        status = read_status(directory)
        recorded = status.get("inputs") or {}
        now = inputs[cell.id]
        what = []
        task_then = _run_record(directory).get("task") or recorded.get("task")
        if task_then and now["task"] and task_then != now["task"]:
            what.append(f"the task's data ({cell.settings.get('task')})")
        if recorded.get("model") and now["model"] and recorded["model"] != now["model"]:
            what.append(f"the model's files ({_shown(cell.settings.get('model'))})")
        elif not recorded.get("model") and now["model"] and status.get("state") == "done":
            unchecked.append(cell)
        if what:
            changed[cell.id] = what
    return changed, unchecked


def _shown(model: Any) -> str:
    if isinstance(model, list):
        return f"{model[0]} (+{len(model) - 1} chunks)" if len(model) > 1 else str(model[0])
    return str(model)


def set_aside(root: Path, cells: Sequence[Cell]) -> list[Path]:
    """Move ``cells``' directories to ``root/replaced/<name>-<time>`` (nothing deleted);
    the cells are then pending."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for cell in cells:
        target = root / "replaced" / f"{cell.name}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        cell_directory(root, cell).rename(target)
        moved.append(target)
    return moved


def record_unchecked(root: Path, cells: Sequence[Cell], inputs) -> None:
    """Write today's inputs into the status of done cells that recorded none, so that
    a later change is caught."""
    for cell in cells:
        directory = cell_directory(root, cell)
        write_status(directory, read_status(directory) | {"inputs": dict(inputs[cell.id])})
