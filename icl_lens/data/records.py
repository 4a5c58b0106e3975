"""Records (dicts of columns and a label) to a :class:`~icl_lens.data.tasks.Task`: label
parsing, template columns, label words inferred from the data, the validation protocol."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
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

TEXT_ALIASES = ("text", "sentence", "content", "review", "input", "document")
LABEL_NAME_COLUMNS = ("label_text", "label_name", "label_str")


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


def _warn_unused_label_words(
    spec: TaskSpec, train: Sequence[Example], validation: Sequence[Example]
) -> None:
    """Warn about label words no example has: they still compete in every prediction
    (e.g. three words given for a two-class file)."""
    used = {ex.label for ex in (*train, *validation)}
    unused = [w for c, w in enumerate(spec.label_words) if c not in used]
    if unused and (train or validation):
        warnings.warn(
            f"task {spec.name!r}: label words {unused} are used by no example "
            f"({len(used)} of {spec.n_classes} classes occur); predictions still choose "
            "among all label words: check the label words and the label column",
            stacklevel=4,
        )


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
    _warn_unused_label_words(spec, train, validation)
    info = {
        **info,
        "n_train": len(train),
        "n_validation_total": n_val,
        "validation_seed": seed,
        "validation_limit": validation_limit,
    }
    return Task(spec, train, validation, info)


HOLDOUT_SEED = 0
"""Seed of every held-out validation split icl-lens makes (a split-less local file,
StaICC's offline copies): fixed, so every run uses the same validation split and the
demonstration pool does not move with the validation shuffle seed."""


def hold_out(
    examples: Sequence[Example], *, size: int | float, seed: int
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Split one labelled pool into ``(train, validation, info)``: a seeded permutation
    of the pool, its first ``size`` examples (a count, or a fraction in (0, 1)) held out
    for validation, the rest kept for demonstrations in their original order. ``info``
    states the held-out size and seed, for results files and reports.

    For sources that ship one split only (a single local file without a ``split``
    column, the offline copies of the paper's tasks, which are train splits).

    >>> pool = [Example({"text": str(i)}, i % 2) for i in range(10)]
    >>> train, val, info = hold_out(pool, size=0.3, seed=0)
    >>> len(train), len(val), info
    (7, 3, {'holdout_size': 3, 'holdout_seed': 0, 'holdout_of': 10})
    >>> sorted(int(e.fields["text"]) for e in train + val) == list(range(10))
    True
    """
    n = len(examples)
    if isinstance(size, float) and not isinstance(size, bool):
        if not 0 < size < 1:
            raise ValueError(f"a held-out fraction must be in (0, 1), got {size}")
        count = max(1, round(size * n))
    else:
        count = int(size)
    if not 0 < count < n:
        raise ValueError(
            f"cannot hold out {count} of {n} examples for validation: both the "
            "demonstration pool and the validation split need at least one example"
        )
    perm = np.random.default_rng(seed).permutation(n)
    held = set(perm[:count].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held]
    validation = [examples[int(i)] for i in perm[:count]]
    info = {"holdout_size": count, "holdout_seed": int(seed), "holdout_of": n}
    return train, validation, info


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
