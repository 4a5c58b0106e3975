"""Tasks from local JSON / JSONL / CSV / TSV files and directories, and back."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icl_lens.data.records import _finish, _resolve_spec, _to_examples
from icl_lens.data.tasks import (
    Example,
    Task,
    TaskSpec,
)

FILE_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


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
