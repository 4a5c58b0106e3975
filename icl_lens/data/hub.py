"""The paper's six tasks on the Hugging Face Hub: where each lives and how its columns map,
and :func:`download_paper_task`, which saves one as a local file for offline use."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_lens.data.records import _finish, _to_examples
from icl_lens.data.tasks import (
    PAPER_TASKS,
    Task,
    TaskSpec,
    normalize_task_name,
)


class TaskLoadError(RuntimeError):
    """A paper task could not be fetched from the hub (offline, moved, ...)."""


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
        f"icl_lens.data.hub import download_paper_task; download_paper_task('{spec.name}', "
        f"'{spec.name}.jsonl')\""
    )


def download_paper_task(name: str, path: str | os.PathLike) -> Path:
    """Save paper task ``name`` from the Hugging Face Hub as a local task file ``path``
    (format by extension, see :func:`icl_lens.data.local_files.save_task`): both splits
    whole, in the hub's order, so that loading the file offline gives the validation
    queries loading the task from the hub gives.

    >>> download_paper_task("cb", "cb.jsonl")  # doctest: +SKIP
    PosixPath('cb.jsonl')
    """
    from icl_lens.data.local_files import save_task

    key = normalize_task_name(name)
    if key not in PAPER_SOURCES:
        raise ValueError(f"{name!r} is not a paper task: choose from {', '.join(PAPER_SOURCES)}")
    return save_task(_load_paper_task(key, PAPER_TASKS[key], None, None, {}), path)


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
