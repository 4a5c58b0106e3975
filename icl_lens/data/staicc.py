"""The paper's tasks offline: the copies bundled by the StaICC wheel.

``pip install "icl-lens[data]"`` installs `StaICC <https://pypi.org/project/StaICC/>`_
(Apache-2.0), which ships the train splits of five of the paper's six tasks as pickles of
``([text], label)`` lists under ``StaICC/cached_dataset/``. They are read with
:func:`read_staicc_file`, an unpickler that refuses every global, so a tampered file can
build nothing but lists, tuples, strings and numbers: nothing in it runs.

================  ========================  =====================  ==========  ============
task              file                      upstream (hub)         copy        held out
================  ========================  =====================  ==========  ============
``sst2``          ``sst2.dataset``          glue/sst2 train        67,349      872
``sst5``          ``sst5.dataset``          SetFit/sst5 train      8,544       1,101
``mr``            ``rotten_tomatoes...``    rotten_tomatoes train  8,530       1,066
``subj``          ``subjective.dataset``    SetFit/subj train      8,000       2,000
``agnews``        ``agnews.dataset``        ag_news train + test   127,600     7,600
================  ========================  =====================  ==========  ============

Each copy is one labelled pool (AG News: train and test merged), so a validation split
is held out of it with :func:`icl_lens.data.records.hold_out`, of the size of the split the
paper validates on (the "held out" column: the hub's validation split, or its test split
for SUBJ and AG News), with seed ``HOLDOUT_SEED`` (0, shared with split-less local files:
:data:`icl_lens.data.records.HOLDOUT_SEED`); the rest is the demonstration pool,
in the file's order. The validation protocol then applies as for the hub (shuffle with
``seed``, cap at ``validation_limit``). Class indices are the hub datasets' own, checked
by reading examples of every class against ``PAPER_TASKS``' label words. CB has no copy.

>>> task = load_staicc_task("mr")  # doctest: +SKIP
>>> task  # doctest: +SKIP
Task('mr', 2 classes ['Negative', 'Positive'], train=7464, validation=1066, source='staicc')
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from icl_lens.data.records import HOLDOUT_SEED, _finish, hold_out
from icl_lens.data.tasks import PAPER_TASKS, Example, Task, TaskSpec

__all__ = [
    "HOLDOUT_SEED",
    "STAICC_COPIES",
    "StaICCCopy",
    "StaICCFileError",
    "load_staicc_task",
    "read_staicc_file",
    "staicc_available",
]

PIP_HINT = 'pip install "icl-lens[data]"  (or: pip install StaICC)'


@dataclass(frozen=True)
class StaICCCopy:
    """A paper task's StaICC copy: its file, what it was made from, and the size of the
    validation split held out of it."""

    file: str
    upstream: str
    validation_size: int


STAICC_COPIES: dict[str, StaICCCopy] = {
    "sst2": StaICCCopy("sst2.dataset", "glue/sst2 train", 872),
    "sst5": StaICCCopy("sst5.dataset", "SetFit/sst5 train", 1101),
    "mr": StaICCCopy("rotten_tomatoes.dataset", "rotten_tomatoes train", 1066),
    "subj": StaICCCopy("subjective.dataset", "SetFit/subj train", 2000),
    "agnews": StaICCCopy("agnews.dataset", "ag_news train+test", 7600),
}
"""The paper tasks StaICC has a copy of, keyed like ``PAPER_TASKS`` (no ``cb``)."""


REINSTALL = "reinstall StaICC: pip install --force-reinstall --no-deps StaICC"


class StaICCFileError(pickle.UnpicklingError, ValueError):
    """A StaICC dataset file refused (it names a global, which could run code) or not
    readable as a pickle. A ``ValueError`` too, so the CLI prints it as one line."""


class _NoGlobals(pickle.Unpickler):
    """Unpickles containers and scalars only: every class, function or module lookup
    (the only way a pickle can run code) is refused."""

    def find_class(self, module: str, name: str):
        raise StaICCFileError(
            f"refusing to load {module}.{name}: a StaICC dataset file holds only lists, "
            "tuples, strings and integers"
        )

    def persistent_load(self, pid):
        raise StaICCFileError("refusing a persistent id in a StaICC dataset file")


def read_staicc_file(data: bytes | Path, where: str = "StaICC file") -> list[tuple[str, int]]:
    """``(text, label)`` pairs from a StaICC ``*.dataset`` pickle, without running
    anything in it: globals are refused (:class:`StaICCFileError`, naming the fix) and
    the structure is checked to be a list of ``([text], int)`` pairs.

    >>> import pickle
    >>> read_staicc_file(pickle.dumps([(["a fine film"], 1), (["a bore"], 0)]))
    [('a fine film', 1), ('a bore', 0)]
    >>> import os
    >>> read_staicc_file(pickle.dumps([os.getcwd]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    icl_lens.data.staicc.StaICCFileError: StaICC file: refusing to load posix.getcwd: ...
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    try:
        table = _NoGlobals(io.BytesIO(raw)).load()
    except StaICCFileError as err:
        raise StaICCFileError(f"{where}: {err}; nothing in it was run; {REINSTALL}") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise StaICCFileError(
            f"{where} is not a readable StaICC dataset file ({type(err).__name__}: {err}); "
            f"{REINSTALL}"
        ) from None
    if not isinstance(table, list):
        raise ValueError(f"{where}: expected a list of ([text], label) pairs, got {type(table)}")
    out: list[tuple[str, int]] = []
    for i, row in enumerate(table):
        ok = (
            isinstance(row, tuple | list)
            and len(row) == 2
            and isinstance(row[0], list)
            and len(row[0]) == 1
            and isinstance(row[0][0], str)
            and isinstance(row[1], int)
            and not isinstance(row[1], bool)
        )
        if not ok:
            raise ValueError(f"{where}: row {i} is not a ([text], label) pair: {row!r:.120}")
        out.append((row[0][0], row[1]))
    return out


def _staicc_dir() -> Path:
    """The installed StaICC's ``cached_dataset`` folder (``ImportError`` if absent)."""
    try:
        root = resources.files("StaICC")
    except ModuleNotFoundError as err:
        raise ImportError(f"StaICC is not installed: {PIP_HINT}") from err
    return Path(str(root)) / "cached_dataset"


def staicc_available() -> bool:
    """Whether StaICC's dataset copies are installed."""
    try:
        return _staicc_dir().is_dir()
    except ImportError:
        return False


def load_staicc_task(
    key: str,
    spec: TaskSpec | None = None,
    *,
    validation_limit: int | None = 2000,
    seed: int | None = 1,
) -> Task:
    """A paper task from its StaICC copy (see the module docstring for the splits).

    ``key`` is a canonical paper task name; ``spec`` overrides the registry's template /
    label words (the class order is the dataset's). Raises ``ValueError`` for a task
    StaICC has no copy of (CB) and ``ImportError`` naming the pip command when StaICC is
    not installed.

    >>> load_staicc_task("sst2", validation_limit=100).source  # doctest: +SKIP
    'staicc'
    """
    if key not in STAICC_COPIES:
        raise ValueError(
            f"no offline copy of {key!r} exists: StaICC bundles {', '.join(STAICC_COPIES)} only"
        )
    spec = spec or PAPER_TASKS[key]
    if len(spec.template_fields) != 1:
        raise ValueError(
            f"task {key!r}: the StaICC copy has one text per example; template "
            f"{spec.template!r} needs {list(spec.template_fields)}"
        )
    copy = STAICC_COPIES[key]
    path = _staicc_dir() / copy.file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed StaICC; reinstall it: {PIP_HINT}"
        )
    rows = read_staicc_file(path, str(path))
    examples: list[Example] = []
    for i, (text, label) in enumerate(rows):
        if not 0 <= label < spec.n_classes:
            raise ValueError(
                f"{path} row {i}: label {label} outside 0..{spec.n_classes - 1} of task {key!r}"
            )
        examples.append(Example({spec.template_fields[0]: text}, label))
    train, validation, held = hold_out(examples, size=copy.validation_size, seed=HOLDOUT_SEED)
    info: dict[str, Any] = {
        "source": "staicc",
        "staicc_file": copy.file,
        "staicc_version": _staicc_version(),
        "upstream": copy.upstream,
        "train_split": "staicc minus held out",
        "validation_split": f"held out of the staicc copy (seed {HOLDOUT_SEED})",
        **held,
    }
    return _finish(spec, train, validation, info, validation_limit, seed)


def _staicc_version() -> str:
    try:
        return metadata.version("StaICC")
    except metadata.PackageNotFoundError:
        return "unknown"
