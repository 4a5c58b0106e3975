"""Tasks from local JSON / JSONL / CSV / TSV files and directories, and back.

Files are read as UTF-8 (a leading byte-order mark is skipped); a file that is not UTF-8,
or a CSV row whose field count differs from the header's, is refused naming the line.
A single file without a ``split`` column is one labelled pool: a fraction of it
(:data:`VALIDATION_FRACTION`, 0.2 by default) is held out for validation with the fixed
seed :data:`HOLDOUT_SEED`, and ``task.info`` states the sizes and the seed.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icl_lens.data.records import HOLDOUT_SEED, _finish, _resolve_spec, _to_examples, hold_out
from icl_lens.data.tasks import (
    Example,
    Task,
    TaskSpec,
)

FILE_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
UNSPLIT = "unsplit"
"""read_records' key for the records of a single file without a ``split`` column."""
VALIDATION_FRACTION = 0.2
"""Share of a split-less file held out for validation (``--validation-fraction``)."""
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, without a leading byte-order mark (Excel writes one); a
    file that is not UTF-8 is refused naming the line."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
            "UTF-8 (e.g. 'CSV UTF-8' in Excel, or iconv -f latin1 -t utf-8)"
        ) from None


def _read_csv(path: Path, text: str, delimiter: str) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV text; a row with fewer or more fields than the header is refused
    naming its line (csv.DictReader would fill in None or drop them)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    for row in reader:
        header = reader.fieldnames or []
        if None in row:
            raise ValueError(
                f"{path}:{reader.line_num}: the row has more fields than the header's "
                f"{len(header)} ({', '.join(header)}); quote values that contain {delimiter!r}"
            )
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise ValueError(
                f"{path}:{reader.line_num}: the row has {len(header) - len(missing)} fields, "
                f"the header {len(header)}: no value for {', '.join(missing)}"
            )
        rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise ValueError(f"{path}: unsupported file type {ext!r}; use one of {FILE_EXTENSIONS}")
    text = _read_text(path)
    if ext in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON: {err}") from None
        return out
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if isinstance(data, list):
            return data
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return data
        raise ValueError(
            f"{path}: expected a list of records or {{'train': [...], 'validation': [...]}}"
        )
    return _read_csv(path, text, "\t" if ext == ".tsv" else ",")


def _group_splits(data, where: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    if isinstance(data, dict):
        for key, recs in data.items():
            split = _SPLIT_ALIASES.get(key.lower())
            if split is None:
                raise ValueError(f"{where}: unknown split {key!r}; use train and validation")
            groups.setdefault(split, []).extend(recs)
        return groups
    if data and not any(isinstance(r, Mapping) and "split" in r for r in data):
        return {UNSPLIT: list(data)}
    if data and not all(isinstance(r, Mapping) and "split" in r for r in data):
        missing = next(
            i for i, r in enumerate(data) if not isinstance(r, Mapping) or "split" not in r
        )
        raise ValueError(
            f"{where} record {missing}: no 'split' value; give every record a split (train / "
            "validation), or none to hold out a validation split automatically"
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

    A "test" split is used as validation when there is no validation split. A single
    file without a ``split`` column comes back as ``{"unsplit": records}``
    (:func:`load_task` holds a validation split out of it).
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
        if UNSPLIT in groups:
            return groups
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
    validation_fraction: float = VALIDATION_FRACTION,
) -> Task:
    groups = read_records(path)
    name = _task_name_for(path)
    records = [r for split in groups.values() for r in split]
    spec = _resolve_spec(name, records, spec, template, label_words, str(path))
    cols = dict(columns or {})
    info: dict[str, Any] = {"source": "file", "path": str(path)}
    if UNSPLIT in groups:
        pool = _to_examples(groups[UNSPLIT], spec, cols, str(path))
        train, val, held = hold_out(pool, size=float(validation_fraction), seed=HOLDOUT_SEED)
        info |= held
        info["validation_split"] = (
            f"held out of {path.name} (no split column): {held['holdout_size']} of "
            f"{held['holdout_of']} records, fraction {validation_fraction:g}, seed {HOLDOUT_SEED}"
        )
    else:
        train = _to_examples(groups["train"], spec, cols, f"{path} [train]")
        val = _to_examples(groups["validation"], spec, cols, f"{path} [validation]")
    return _finish(spec, train, val, info, validation_limit, seed)


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
