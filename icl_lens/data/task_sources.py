"""Where tasks come from: the paper's six hub datasets, local files, Python records.

``load_task(name_or_path)`` takes either a paper task name (``"sst2"``, ``"sst5"``,
``"mr"``, ``"subj"``, ``"agnews"``, ``"cb"``; any spelling such as ``"SST-2"`` or
``"ag_news"``) loaded with ``datasets.load_dataset``, or a local file / directory.

Local files (a path that exists always wins over a task name):

* ``*.jsonl`` / ``*.ndjson``: one JSON record per line.
* ``*.json``: a list of records, or ``{"train": [...], "validation": [...]}``.
* ``*.csv`` / ``*.tsv``: a header row, one record per row.
* a directory holding ``train.<ext>`` and ``validation.<ext>`` (``valid``/``val``/``dev``/
  ``test`` are accepted for validation), each one of the formats above.

A single file of records says which split each record belongs to in a ``split`` column
(``train``; ``validation``, ``valid``, ``val``, ``dev`` or ``test``). A record carries one
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

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from icl_lens.data.tasks import (
    DEFAULT_TEMPLATE,
    PAPER_TASKS,
    Example,
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

FILE_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
TEXT_ALIASES = ("text", "sentence", "content", "review", "input", "document")
LABEL_NAME_COLUMNS = ("label_text", "label_name", "label_str")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


class TaskLoadError(RuntimeError):
    """A paper task could not be fetched from the hub (offline, moved, ...)."""


# --------------------------------------------------------------------------------------
# Hub sources of the paper's tasks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where a paper task lives on the Hugging Face Hub and how its columns map.

    ``paths`` are tried in order (the current repository first, the name used by the
    authors' code last); ``columns`` maps template fields to dataset columns;
    ``class_names``, when the dataset's label is a ``ClassLabel``, are checked against
    its names so a reordered label scheme cannot silently flip the label words.
    """

    paper_id: str
    paths: tuple[str, ...]
    config: str | None
    train_split: str
    validation_split: str
    columns: Mapping[str, str]
    label_column: str = "label"
    class_names: tuple[str, ...] | None = None


PAPER_SOURCES: dict[str, HubSource] = {
    "sst2": HubSource(
        "glue/sst2",
        ("nyu-mll/glue", "glue"),
        "sst2",
        "train",
        "validation",  # glue's test labels are hidden (-1)
        {"text": "sentence"},
        class_names=("negative", "positive"),
    ),
    "sst5": HubSource(
        "SetFit/sst5", ("SetFit/sst5",), None, "train", "validation", {"text": "text"}
    ),
    "mr": HubSource(
        "rotten_tomatoes",
        ("cornell-movie-review-data/rotten_tomatoes", "rotten_tomatoes"),
        None,
        "train",
        "validation",
        {"text": "text"},
        class_names=("neg", "pos"),
    ),
    "subj": HubSource("SetFit/subj", ("SetFit/subj",), None, "train", "test", {"text": "text"}),
    "agnews": HubSource(
        "ag_news",
        ("fancyzhx/ag_news", "ag_news"),
        None,
        "train",
        "test",  # ag_news has no validation split; the authors validate on test
        {"text": "text"},
        class_names=("world", "sports", "business", "sci/tech"),
    ),
    "cb": HubSource(
        "super_glue/cb",
        ("aps/super_glue", "super_glue"),
        "cb",
        "train",
        "validation",
        {"premise": "premise", "hypothesis": "hypothesis"},
        # 0=entailment -> " True", 1=contradiction -> " False", 2=neutral -> " Neither"
        class_names=("entailment", "contradiction", "neutral"),
    ),
}
"""Hub location of each paper task (method.md section 5), keyed like ``PAPER_TASKS``."""


def _local_file_hint(spec: TaskSpec) -> str:
    fields = {f: "..." for f in spec.template_fields}
    a = json.dumps({**fields, "label": 0, "split": "train"})
    b = json.dumps({**fields, "label": spec.label_names[-1], "split": "validation"})
    return (
        f"Pass a local file instead, e.g. `icl-lens run --task path/to/{spec.name}.jsonl` or "
        f"`icl_lens.data.task_sources.load_task('path/to/{spec.name}.jsonl')`, one JSON record per "
        f"line such as\n    {a}\n    {b}\n"
        f"with columns {', '.join(spec.template_fields)}, label (class index "
        f"0..{spec.n_classes - 1} or one of {', '.join(spec.label_names)}) and split "
        "(train / validation); CSV with the same columns, or a directory with train.jsonl "
        f"and validation.jsonl, work too. A file named {spec.name}.* gets this task's template "
        'and label words. To make one on a machine with network: python -c "from '
        "icl_lens.data.task_sources import load_task, save_task; save_task(load_task("
        f"'{spec.name}', validation_limit=None, seed=None), '{spec.name}.jsonl')\""
    )


def _load_hub_dataset(key: str, hub_kwargs: Mapping[str, Any]):
    src = PAPER_SOURCES[key]
    spec = PAPER_TASKS[key]
    try:
        import datasets
        from datasets.exceptions import DatasetNotFoundError
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise TaskLoadError(
            f"loading paper task {key!r} needs the `datasets` package. {_local_file_hint(spec)}"
        ) from err

    last: Exception | None = None
    tried: list[str] = []
    for path in src.paths:
        call = f"load_dataset({path!r}" + (f", {src.config!r})" if src.config else ")")
        tried.append(call)
        try:
            try:
                return datasets.load_dataset(path, src.config, **hub_kwargs), path
            except RuntimeError as err:
                # datasets>=4 refuses repositories that still ship a loading script; the
                # hub's automatic parquet conversion has the same data.
                if "scripts are no longer supported" not in str(err) or "revision" in hub_kwargs:
                    raise
                tried.append(call[:-1] + ", revision='refs/convert/parquet')")
                kw = {**hub_kwargs, "revision": "refs/convert/parquet"}
                return datasets.load_dataset(path, src.config, **kw), path
        except DatasetNotFoundError as err:  # moved or renamed: try the next name
            last = err
            continue
        except Exception as err:  # offline, network, hub errors: fail now, with the way out
            last = err
            break
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")
    why = (
        "Hugging Face offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the "
        "dataset is not in the local cache"
        if offline
        else "the hub could not be reached or the dataset was not found"
    )
    raise TaskLoadError(
        f"could not load paper task {key!r} ({src.paper_id}) from the Hugging Face Hub: "
        f"{why}. Tried {'; '.join(tried)} -> {type(last).__name__}: {last}\n"
        + _local_file_hint(spec)
    ) from last


def _check_class_names(key: str, ds, src: HubSource) -> None:
    if src.class_names is None:
        return
    names = getattr(ds.features.get(src.label_column), "names", None)
    if names is None:
        return
    if [n.lower() for n in names] != list(src.class_names):
        raise ValueError(
            f"paper task {key!r}: the hub dataset's labels are {names}, expected "
            f"{list(src.class_names)} in that order to match label words "
            f"{list(PAPER_TASKS[key].label_words)}; the dataset changed, pass a TaskSpec "
            "with label words in its order"
        )


def _hub_split_records(ds, src: HubSource) -> list[dict[str, Any]]:
    cols = [*dict.fromkeys([*src.columns.values(), src.label_column])]
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"hub dataset {src.paper_id}: columns {missing} missing; it has {ds.column_names}"
        )
    data = ds.select_columns(cols).to_dict()
    n = len(data[src.label_column])
    return [
        {
            **{f: data[c][i] for f, c in src.columns.items()},
            "label": data[src.label_column][i],
        }
        for i in range(n)
    ]


def _load_paper_task(
    key: str, spec: TaskSpec, validation_limit: int | None, seed: int | None, hub_kwargs
) -> Task:
    src = PAPER_SOURCES[key]
    dsd, path = _load_hub_dataset(key, hub_kwargs)
    for split in (src.train_split, src.validation_split):
        if split not in dsd:
            raise ValueError(f"hub dataset {path}: no split {split!r}; it has {list(dsd)}")
    _check_class_names(key, dsd[src.train_split], src)
    train = _to_examples(_hub_split_records(dsd[src.train_split], src), spec, {}, "train")
    val = _to_examples(
        _hub_split_records(dsd[src.validation_split], src), spec, {}, src.validation_split
    )
    info = {
        "source": "hub",
        "hub_path": path,
        "hub_config": src.config,
        "paper_hub_id": src.paper_id,
        "train_split": src.train_split,
        "validation_split": src.validation_split,
    }
    return _finish(spec, train, val, info, validation_limit, seed)


# --------------------------------------------------------------------------------------
# Records -> examples
# --------------------------------------------------------------------------------------


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | np.integer):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None


def _parse_label(value: Any, spec: TaskSpec, where: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: missing label")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{where}: label {value!r} is not a class index")
    try:
        if isinstance(value, str):
            try:
                return spec.label_index(value)
            except ValueError:
                if _is_int_like(value):
                    return spec.label_index(int(value))
                raise
        if _is_int_like(value):
            return spec.label_index(int(value))
        return spec.label_index(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


def _field_columns(
    spec: TaskSpec, keys: Iterable[str], columns: Mapping[str, str], where: str
) -> dict[str, str]:
    keys = list(keys)
    mapping: dict[str, str] = {}
    for f in spec.template_fields:
        if f in columns:
            col = columns[f]
        elif f in keys:
            col = f
        elif f == "text" and any(a in keys for a in TEXT_ALIASES):
            col = next(a for a in TEXT_ALIASES if a in keys)
        else:
            raise ValueError(
                f"{where}: template {spec.template!r} needs a column {f!r}; the records have "
                f"{keys}. Rename the column, or pass columns={{{f!r}: '<column>'}}"
            )
        mapping[f] = col
    return mapping


def _to_examples(
    records: Sequence[Mapping[str, Any]],
    spec: TaskSpec,
    columns: Mapping[str, str],
    where: str,
) -> list[Example]:
    if not records:
        return []
    if not isinstance(records[0], Mapping):
        raise ValueError(f"{where} record 0: expected an object/dict, got {type(records[0])}")
    mapping = _field_columns(spec, records[0].keys(), columns, f"{where} record 0")
    out: list[Example] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where} record {i}: expected an object/dict, got {type(rec)}")
        fields: dict[str, str] = {}
        for f, col in mapping.items():
            v = rec.get(col)
            if v is None:
                raise ValueError(
                    f"{where} record {i}: no value for column {col!r} (template field {f!r})"
                )
            fields[f] = v if isinstance(v, str) else str(v)
        if "label" not in rec:
            raise ValueError(f"{where} record {i}: no 'label' column; it has {list(rec)}")
        out.append(Example(fields, _parse_label(rec["label"], spec, f"{where} record {i}")))
    return out


def _infer_label_words(records: Iterable[Mapping[str, Any]], where: str) -> tuple[str, ...]:
    records = list(records)
    labels = [r.get("label") for r in records]
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in labels):
        raise ValueError(f"{where}: some records have no label")
    if all(_is_int_like(v) for v in labels):
        name_col = next((c for c in LABEL_NAME_COLUMNS if records and c in records[0]), None)
        if name_col is None:
            raise ValueError(
                f"{where}: labels are class indices and there is no spec to name them; pass "
                "label_words=(' Negative', ' Positive') (one per class, in index order, with "
                f"the leading space), a TaskSpec, or add a {LABEL_NAME_COLUMNS[0]!r} column"
            )
        names: dict[int, str] = {}
        for r in records:
            idx, name = int(r["label"]), str(r.get(name_col, "")).strip()
            if names.setdefault(idx, name) != name:
                raise ValueError(
                    f"{where}: label {idx} is named both {names[idx]!r} and {name!r} "
                    f"in column {name_col!r}"
                )
        if sorted(names) != list(range(len(names))):
            raise ValueError(
                f"{where}: class indices {sorted(names)} are not 0..n-1; pass label_words="
            )
        return tuple(" " + names[i] for i in range(len(names)))
    if any(_is_int_like(v) for v in labels):
        raise ValueError(
            f"{where}: labels mix class indices and label words and there is no spec; pass "
            "label_words= or a TaskSpec"
        )
    return tuple(w if w[:1].isspace() else " " + w for w in sorted({str(v) for v in labels}))


def _resolve_spec(
    name: str,
    records: Iterable[Mapping[str, Any]] | None,
    spec: TaskSpec | None,
    template: str | None,
    label_words: Sequence[str] | None,
    where: str,
) -> TaskSpec:
    base = spec
    if base is None and normalize_task_name(name) in PAPER_TASKS:
        base = PAPER_TASKS[normalize_task_name(name)]
    if base is not None:
        kw: dict[str, Any] = {}
        if template is not None:
            kw["template"] = template
        if label_words is not None:
            kw["label_words"] = tuple(label_words)
        return replace(base, **kw) if kw else base
    if label_words is None:
        label_words = _infer_label_words(records or [], where)
    return TaskSpec(name, template or DEFAULT_TEMPLATE, tuple(label_words))


def _finish(
    spec: TaskSpec,
    train: list[Example],
    validation: list[Example],
    info: dict,
    validation_limit: int | None,
    seed: int | None,
) -> Task:
    if validation_limit is not None and validation_limit < 0:
        raise ValueError(f"validation_limit must be >= 0 or None, got {validation_limit}")
    n_val = len(validation)
    if seed is not None:
        # == datasets.Dataset.shuffle(seed=seed), which the authors' code applies (seed 1)
        perm = np.random.default_rng(seed).permutation(n_val)
        validation = [validation[i] for i in perm]
    if validation_limit is not None:
        validation = validation[:validation_limit]
    info = {
        **info,
        "n_train": len(train),
        "n_validation_total": n_val,
        "validation_seed": seed,
        "validation_limit": validation_limit,
    }
    return Task(spec, train, validation, info)


def task_from_records(
    train_records: Sequence[Mapping[str, Any]],
    validation_records: Sequence[Mapping[str, Any]],
    spec: TaskSpec | None = None,
    *,
    name: str = "custom",
    template: str | None = None,
    label_words: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
    validation_limit: int | None = None,
    seed: int | None = None,
) -> Task:
    """A :class:`Task` from records given in Python (dicts with template fields and a label).

    Labels are class indices or label words. Without ``spec`` the spec is resolved as for
    a local file named ``name`` (see the module docstring). By default the validation
    records are kept as given; ``seed``/``validation_limit`` apply the paper's shuffle-and-
    cap protocol.

    >>> t = task_from_records([{"text": "yay", "label": "pos"}, {"text": "meh", "label": "neg"}],
    ...                       [{"text": "ok", "label": "pos"}])
    >>> t.spec.label_words, [ex.label for ex in t.train]
    ((' neg', ' pos'), [1, 0])
    """
    train_records, validation_records = list(train_records), list(validation_records)
    spec = _resolve_spec(
        name,
        [*train_records, *validation_records],
        spec,
        template,
        label_words,
        f"task {name!r}",
    )
    columns = dict(columns or {})
    train = _to_examples(train_records, spec, columns, "train")
    val = _to_examples(validation_records, spec, columns, "validation")
    return _finish(spec, train, val, {"source": "records"}, validation_limit, seed)


# --------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------


def _read_file(path: Path) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        out = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not valid JSON: {err}") from None
        return out
    if ext == ".json":
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return data
        raise ValueError(
            f"{path}: expected a list of records or {{'train': [...], 'validation': [...]}}"
        )
    if ext in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ","))
    raise ValueError(f"{path}: unsupported file type {ext!r}; use one of {FILE_EXTENSIONS}")


def _group_splits(data, where: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    if isinstance(data, dict):
        for key, recs in data.items():
            split = _SPLIT_ALIASES.get(key.lower())
            if split is None:
                raise ValueError(f"{where}: unknown split {key!r}; use train and validation")
            groups.setdefault(split, []).extend(recs)
        return groups
    if data and not all(isinstance(r, Mapping) and "split" in r for r in data):
        raise ValueError(
            f"{where}: a single file needs a 'split' column (train / validation) on every "
            "record, or use a directory with train.<ext> and validation.<ext>"
        )
    for i, rec in enumerate(data):
        split = _SPLIT_ALIASES.get(str(rec["split"]).strip().lower())
        if split is None:
            raise ValueError(
                f"{where} record {i}: split {rec['split']!r} is not train / validation / test"
            )
        groups.setdefault(split, []).append(rec)
    return groups


def _find_split_file(directory: Path, names: Sequence[str]) -> Path | None:
    for stem in names:
        for ext in FILE_EXTENSIONS:
            p = directory / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def read_records(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Raw records of a local task file or directory, by split ("train", "validation").

    A "test" split is used as validation when there is no validation split.
    """
    path = Path(path)
    if path.is_dir():
        train = _find_split_file(path, ("train", "training"))
        val = _find_split_file(path, ("validation", "valid", "val", "dev", "test"))
        if train is None or val is None:
            present = sorted(p.name for p in path.iterdir())[:20]
            raise ValueError(
                f"{path}: a task directory needs train.<ext> and validation.<ext> (ext one of "
                f"{', '.join(FILE_EXTENSIONS)}); it holds {present}"
            )
        groups = {}
        for split, p in (("train", train), ("validation", val)):
            data = _read_file(p)
            if isinstance(data, dict):
                raise ValueError(f"{p}: a split file must hold a list of records")
            groups[split] = data
    else:
        groups = _group_splits(_read_file(path), str(path))
    if "validation" not in groups and "test" in groups:
        groups["validation"] = groups.pop("test")
    groups.pop("test", None)
    if not groups.get("train"):
        raise ValueError(f"{path}: no train records (splits found: {sorted(groups)})")
    if not groups.get("validation"):
        raise ValueError(
            f"{path}: no validation records (splits found: {sorted(groups)}); mark some "
            "records with split 'validation'"
        )
    return groups


def _task_name_for(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _load_local(
    path: Path,
    spec: TaskSpec | None,
    template: str | None,
    label_words: Sequence[str] | None,
    columns: Mapping[str, str] | None,
    validation_limit: int | None,
    seed: int | None,
) -> Task:
    groups = read_records(path)
    name = _task_name_for(path)
    spec = _resolve_spec(
        name, [*groups["train"], *groups["validation"]], spec, template, label_words, str(path)
    )
    cols = dict(columns or {})
    train = _to_examples(groups["train"], spec, cols, f"{path} [train]")
    val = _to_examples(groups["validation"], spec, cols, f"{path} [validation]")
    return _finish(spec, train, val, {"source": "file", "path": str(path)}, validation_limit, seed)


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
) -> Task:
    """Load a paper task from the hub, or a task from a local file or directory.

    ``name_or_path``: an existing file or directory (see the module docstring for the
    formats), else a paper task name. ``spec`` / ``template`` / ``label_words`` override
    the registry's (for hub tasks the class order stays the dataset's). ``columns`` maps
    template fields to record columns. ``seed`` is the validation shuffle seed (1, as in
    the authors' code; ``None`` keeps the split's order) and ``validation_limit`` caps the
    validation queries after shuffling (``None``: all). ``hub_kwargs`` go to
    ``datasets.load_dataset`` (``cache_dir``, ``revision``, ...). Demonstrations are not
    drawn here: see :func:`icl_lens.data.demonstrations.sample_demonstrations`.

    Raises :class:`TaskLoadError` (chained from the hub error) when a paper task cannot be
    fetched, with instructions for passing a local file instead.

    >>> task = load_task("sst2")  # doctest: +SKIP
    >>> task  # doctest: +SKIP
    Task('sst2', 2 classes ['Negative', 'Positive'], train=67349, validation=872, source='hub')
    """
    path = Path(name_or_path)
    if path.exists():
        return _load_local(path, spec, template, label_words, columns, validation_limit, seed)
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
        return _load_paper_task(key, resolved, validation_limit, seed, dict(hub_kwargs or {}))
    if path.suffix or os.sep in str(name_or_path):
        raise FileNotFoundError(f"no task file or directory at {str(path)!r}")
    raise ValueError(
        f"unknown task {str(name_or_path)!r}: not a file or directory, and not a paper task "
        f"({', '.join(PAPER_TASKS)}). Local files: .jsonl/.json/.csv/.tsv with a split "
        "column, or a directory with train.* and validation.*"
    )


def save_task(task: Task, path: str | os.PathLike) -> Path:
    """Write ``task`` as a local task file that :func:`load_task` reads back.

    The format follows the extension: ``.jsonl`` (one record per line with a ``split``
    column), ``.json`` (``{"train": [...], "validation": [...]}``) or ``.csv``. Records hold
    the template fields, ``label`` (class index), ``label_text`` (label word, stripped) and
    ``split``. For an exact offline copy of a hub task save it loaded with
    ``validation_limit=None, seed=None``: loading the file with the defaults then gives
    the same validation queries as loading from the hub.
    """
    path = Path(path)

    def rows(split: str, examples: list[Example]) -> list[dict[str, Any]]:
        return [
            {
                **ex.fields,
                "label": ex.label,
                "label_text": task.spec.label_names[ex.label],
                "split": split,
            }
            for ex in examples
        ]

    train, val = rows("train", task.train), rows("validation", task.validation)
    ext = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext in (".jsonl", ".ndjson"):
        with path.open("w", encoding="utf-8") as fh:
            for r in (*train, *val):
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif ext == ".json":
        for r in (*train, *val):
            del r["split"]
        path.write_text(json.dumps({"train": train, "validation": val}, ensure_ascii=False))
    elif ext in (".csv", ".tsv"):
        header = [*task.spec.template_fields, "label", "label_text", "split"]
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, header, delimiter="\t" if ext == ".tsv" else ",")
            w.writeheader()
            w.writerows([*train, *val])
    else:
        raise ValueError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json or .csv")
    return path
