"""The ``--out`` directory of ``icl-lens run``: checked before any work, held by one run.

:func:`claim_output_directory` refuses a path that is a file or cannot be created before
the model is loaded, takes an exclusive lock on the directory (``filelock``) so that a
second run on the same ``--out`` is refused instead of mixing checkpoints, and, when the
run fails, removes the directories it created if nothing was written in them.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
>>> with claim_output_directory(out) as path:
...     path.is_dir()
True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from icl_lens.errors import UserError

LOCK_FILE = ".icl-lens.lock"
"""Lock file inside a run directory while a run uses it."""


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")  # pragma: no cover - the root always exists


def check_output_directory(path: Path, option: str = "--out") -> None:
    """Refuse, with what to do, an output path that is a file or cannot be created or
    written; creates nothing."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a directory (it is created if missing)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"cannot create {option} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write {option} {path}: {base} is not writable; choose a writable location"
        )


def _created_dirs(path: Path) -> list[Path]:
    """The directories ``mkdir(parents=True)`` would create for ``path``, deepest first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


@contextlib.contextmanager
def claim_output_directory(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Check, create and lock ``path`` for one run; see the module docstring."""
    path = Path(path)
    check_output_directory(path, option)
    created = _created_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {option} {path}: {err.strerror or err}") from err
    lock = FileLock(str(path / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{option} {path} is in use by another icl-lens run (it holds {LOCK_FILE}); wait "
            f"for that run to finish, or choose another {option}"
        ) from None
    finished = False
    try:
        yield path
        finished = True
    finally:
        if not finished and created:
            with contextlib.suppress(OSError):
                os.unlink(path / LOCK_FILE)
        lock.release()
        if not finished:
            for directory in created:  # deepest first; only if nothing was written there
                with contextlib.suppress(OSError):
                    directory.rmdir()
