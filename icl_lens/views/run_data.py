"""What a report shows, as data: a run directory read back (:class:`RunData`) and the
per-token data of its circuitsvis panels (:class:`ViewData`, ``views.json``).

A run directory holds ``results.json`` and ``metrics.csv`` (written by ``icl-lens run``
or :meth:`Comparison.to_json` / ``to_csv``) and, optionally, ``views.json``, written by
:func:`save_views` from the model, the ICL prompt and the finetuned model (or its
learning rate); ``interventions.json`` (``icl-lens run --interventions``,
``Interventions.to_json``) and ``transplant_view.json``, written by
:func:`save_transplant_view` from the model and that result (the top head's transplanted
update, token by token).

>>> save_views("runs/toy", model, prompt, ft_lr=cmp.lr, spec=task.spec)  # doctest: +SKIP
>>> load_run("runs/toy").metrics.head()                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.analyses import FRAME_COLUMNS, with_head_labels
from icl_lens.files import atomic_write_text
from icl_lens.model.adapter import adapt
from icl_lens.study.duality import decompose
from icl_lens.study.finetune import finetune
from icl_lens.study.intervention_result import Interventions
from icl_lens.study.predict import label_tokens as task_label_tokens
from icl_lens.views.attention import AttentionComparison, attention_comparison
from icl_lens.views.heatmaps import head_summary
from icl_lens.views.interventions import transplant_data
from icl_lens.views.meta_gradients import (
    MetaGradients,
    meta_gradients,
    top_heads,
    top_heads_heading,
)
from icl_lens.views.page import View, display_tokens, plain

__all__ = [
    "RunData",
    "ViewData",
    "collect_views",
    "load_run",
    "normalise_frame",
    "save_transplant_view",
    "save_views",
]

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.csv"
VIEWS_FILE = "views.json"
INTERVENTIONS_FILE = "interventions.json"
TRANSPLANT_FILE = "transplant_view.json"

# ---------------------------------------------------------------------------------------
# Per-token view data (views.json)
# ---------------------------------------------------------------------------------------


@dataclass
class ViewData:
    """What the circuitsvis panels of a report need, for one ICL prompt.

    ``meta_gradients``: the top heads' per-token terms; ``attention``: the query's
    attention under ZSL / ICL / FT at one layer; ``heads``: the per-(layer, head)
    summary of the decomposition (:func:`~icl_lens.views.heatmaps.head_summary`);
    ``query``: the query text; ``labels``: the label words (class 0, class 1) when known.
    """

    meta_gradients: list[MetaGradients]
    attention: AttentionComparison | None = None
    heads: pd.DataFrame | None = None
    query: str = ""
    labels: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return plain(
            {
                "meta_gradients": [m.to_dict() for m in self.meta_gradients],
                "attention": None if self.attention is None else self.attention.to_dict(),
                "heads": None if self.heads is None else self.heads.to_dict(orient="list"),
                "query": self.query,
                "labels": None if self.labels is None else list(self.labels),
                "info": self.info,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ViewData:
        _check_view_shape(data)
        att = data.get("attention")
        heads = data.get("heads")
        labels = data.get("labels")
        return cls(
            meta_gradients=[MetaGradients.from_dict(m) for m in data.get("meta_gradients", [])],
            attention=None if att is None else AttentionComparison.from_dict(att),
            heads=None if heads is None else with_head_labels(pd.DataFrame(heads)),
            query=str(data.get("query", "")),
            labels=None if labels is None else tuple(str(x) for x in labels),
            info=dict(data.get("info", {})),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``DIRECTORY/views.json`` atomically."""
        text = json.dumps(self.to_dict(), allow_nan=False)
        return atomic_write_text(Path(directory) / VIEWS_FILE, text + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ViewData:
        return cls.from_dict(json.loads((Path(directory) / VIEWS_FILE).read_text()))

    def view(self) -> View:
        """The circuitsvis panels: top heads' meta-gradients, then the attention."""
        parts: list[Any] = []
        if self.meta_gradients:
            parts.append(top_heads_heading(m.head_label for m in self.meta_gradients))
            parts += [m.view() for m in self.meta_gradients]
        if self.attention is not None:
            parts.append(self.attention.view())
        return View(*parts)


VIEW_KEYS = {
    "meta_gradients": ("layer", "head", "position", "tokens", "is_demo", "values"),
    "attention": ("layer", "heads", "tokens", "patterns"),
    "heads": ("layer", "head"),
}
"""Keys every entry of a views.json section must have."""


def _require_keys(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where} has no {', '.join(map(repr, missing))}")


def _check_view_shape(data: Any) -> None:
    """Refuse view data of the wrong shape naming the entry, instead of a bare KeyError
    from deep in the report."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"expected an object with {', '.join(VIEW_KEYS)}, got {type(data).__name__}"
        )
    entries = data.get("meta_gradients", [])
    if not isinstance(entries, list):
        raise ValueError(f"meta_gradients must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        _require_keys(entry, VIEW_KEYS["meta_gradients"], f"meta_gradients[{i}]")
    for section in ("attention", "heads"):
        if data.get(section) is not None:
            _require_keys(data[section], VIEW_KEYS[section], section)
    heads = data.get("heads")
    if (
        heads is not None
        and len({len(v) if isinstance(v, list) else -1 for v in heads.values()}) > 1
    ):
        raise ValueError("heads must hold lists of one length (one entry per layer and head)")
    for section, kind, name in (("labels", list, "a list"), ("info", dict, "an object")):
        if data.get(section) is not None and not isinstance(data[section], kind):
            raise ValueError(f"{section} must be {name}, got {type(data[section]).__name__}")


def _label_info(model, spec) -> tuple[tuple[int, int] | None, tuple[str, ...] | None]:
    """First label tokens (2-class tasks) and label words of ``spec``."""
    if spec is None:
        return None, None
    names = tuple(str(w).strip() for w in spec.label_words)
    if len(spec.label_words) != 2:
        return None, names
    ids = task_label_tokens(model.tokenizer, spec).first
    return (int(ids[0]), int(ids[1])), names


def collect_views(
    model,
    prompt,
    *,
    ft_model=None,
    ft_lr: float | None = None,
    spec=None,
    label_tokens: tuple[int, int] | None = None,
    labels: Sequence[str] | None = None,
    k: int = 4,
    query: str | None = None,
) -> ViewData:
    """Decompose ``prompt`` (an ICL prompt, e.g. the first validation query after the
    run's demonstrations), keep the ``k`` heads with the largest ``|dW_ICL q|`` and the
    query's attention under ZSL / ICL / FT at the top head's layer.

    FT: ``ft_model`` as given, or finetuned here from ``model`` at ``ft_lr`` (K/V-only
    SGD on the prompt's demonstrations, as the pipeline does); neither: ZSL and ICL only.
    ``spec`` (the task's :class:`~icl_lens.data.tasks.TaskSpec`) supplies the label words;
    a two-class task also gets each token's effect on the label logit difference.

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> data = collect_views(model, p, ft_lr=0.1, k=2)
    >>> len(data.meta_gradients), sorted(data.attention.patterns)
    (2, ['ft', 'icl', 'zsl'])
    """
    adapter = adapt(model)  # once: everything below gets the adapter
    auto_ids, auto_names = _label_info(adapter.model, spec)
    label_tokens = label_tokens if label_tokens is not None else auto_ids
    names = tuple(labels) if labels is not None else auto_names
    pair = names if names is not None and len(names) == 2 and label_tokens else None
    dec = decompose(adapter, prompt, label_tokens=label_tokens)
    heads = top_heads(dec, k)
    mgs = [meta_gradients(dec, la, h, labels=pair) for la, h in heads]
    if ft_model is None and ft_lr is not None:
        result = finetune(adapter, prompt, lr=ft_lr, record_queries=False)
        if result.diverged:
            raise ValueError(f"finetuning at lr={ft_lr:g} diverged; pass a smaller ft_lr")
        ft_model = adapter.with_model(result.model)
    attention = attention_comparison(adapter, prompt, layer=heads[0][0], ft_model=ft_model)
    if query is None:
        tokens = list(prompt.str_tokens)[prompt.query_start :]
        query = "".join(display_tokens(tokens)).strip() if tokens else ""
    return ViewData(
        meta_gradients=mgs,
        attention=attention,
        heads=head_summary(dec.to_frame()),
        query=query,
        labels=names,
        info={"n_demonstrations": len(prompt.demo_spans), "n_tokens": prompt.n_tokens},
    )


def save_views(directory: str | os.PathLike, model, prompt, **kwargs) -> Path:
    """:func:`collect_views` and write it to ``DIRECTORY/views.json``; returns the path.
    ``icl-lens report DIRECTORY`` then includes the circuitsvis panels."""
    return collect_views(model, prompt, **kwargs).save(directory)


def save_transplant_view(
    directory: str | os.PathLike,
    model,
    result: Interventions,
    *,
    layer: int | None = None,
    head: int | None = None,
    query: int = 0,
) -> Path:
    """The transplanted update of head ``(layer, head)`` (default: the most necessary)
    for measured query ``query`` of ``result``, token by token
    (:func:`~icl_lens.views.interventions.transplant_data`), written to
    ``DIRECTORY/transplant_view.json``; ``icl-lens report DIRECTORY`` shows it beside
    ``interventions.json``."""
    data = transplant_data(result, model, layer, head, query)
    text = json.dumps(data.to_dict(), allow_nan=False)
    return atomic_write_text(Path(directory) / TRANSPLANT_FILE, text + "\n")


# ---------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A run's results (the ``results.json`` dict), tidy metric frame and view data;
    its interventions (``interventions.json``) and their transplant view when present."""

    results: dict[str, Any]
    metrics: pd.DataFrame
    views: ViewData | None = None
    source: str = ""
    interventions: Interventions | None = None
    transplant: MetaGradients | None = None


def _read_frame(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable metrics CSV: {err}") from err
    missing = [
        c for c in ("metric", "variant", "baseline", "layer", "head", "value") if c not in frame
    ]
    if missing:
        raise ValueError(
            f"{path} lacks the columns {missing}; expected the tidy metrics format "
            f"({', '.join(FRAME_COLUMNS)})"
        )
    return normalise_frame(frame)


def normalise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The tidy metrics frame with every column of ``FRAME_COLUMNS`` (missing ones
    empty), typed, then ``head_label``, then any other columns the frame has (kept, so
    that the report shows them)."""
    frame = frame.drop(columns=["head_label"], errors="ignore")
    for col in FRAME_COLUMNS:
        if col not in frame:
            frame[col] = np.nan if col not in ("metric", "variant", "baseline") else ""
    for col in ("metric", "variant", "baseline"):
        frame[col] = frame[col].astype(str)
    for col in ("layer", "head"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(-1).astype(int)
    for col in ("value", "ci_low", "ci_high", "n_queries", "n_skipped"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    extra = [c for c in frame.columns if c not in FRAME_COLUMNS]
    return with_head_labels(frame[[*FRAME_COLUMNS, *extra]])


def _frame_from_summary(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The overall rows of a ``results.json`` ``"metrics"`` summary as a tidy frame."""
    rows = []
    for metric, entry in metrics.items():
        if not isinstance(entry, Mapping):
            continue
        variants = entry.get("variants") or {entry.get("variant") or "value": entry}
        for variant, v in variants.items():
            ci = v.get("ci") or [None, None]
            overall = {"metric": metric, "variant": variant, "layer": -1, "head": -1}
            rows.append(
                {
                    **overall,
                    "baseline": "none",
                    "value": v.get("value"),
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "n_queries": v.get("n_queries"),
                    "n_skipped": v.get("n_skipped"),
                }
            )
            for name, value in (v.get("baselines") or {}).items():
                value = value.get("value") if isinstance(value, Mapping) else value
                rows.append({**overall, "baseline": name, "value": value})
    return normalise_frame(pd.DataFrame(rows, columns=list(FRAME_COLUMNS)))


def load_run(directory: str | os.PathLike) -> RunData:
    """Read ``results.json``, ``metrics.csv`` (or the summary in results.json) and
    ``views.json`` (optional) from a run directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is not a directory; give the --out directory of `icl-lens run`"
        )
    results_path = directory / RESULTS_FILE
    if not results_path.is_file():
        raise FileNotFoundError(
            f"no {RESULTS_FILE} in {directory}; run `icl-lens run --out {directory} ...` first"
        )
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{results_path} is not valid JSON: {err}") from err
    if not isinstance(results, dict) or "accuracy" not in results:
        raise ValueError(f'{results_path} has no "accuracy" entry: not an icl-lens results file')
    metrics_path = directory / METRICS_FILE
    if metrics_path.is_file():
        frame = _read_frame(metrics_path)
    elif results.get("table"):
        frame = normalise_frame(pd.DataFrame(results["table"]))
    else:
        frame = _frame_from_summary(results.get("metrics", {}))
    views = None
    if (directory / VIEWS_FILE).is_file():
        try:
            views = ViewData.load(directory)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{directory / VIEWS_FILE} is not valid view data ({err}); write it again "
                "with `icl-lens run`, or delete it to report without the per-token panels"
            ) from err
    interventions, transplant = _load_interventions(directory)
    return RunData(
        results=results,
        metrics=frame,
        views=views,
        source=str(directory),
        interventions=interventions,
        transplant=transplant,
    )


def _load_interventions(directory: Path) -> tuple[Interventions | None, MetaGradients | None]:
    """``interventions.json`` and ``transplant_view.json`` where the run has them."""
    interventions = transplant = None
    path = directory / INTERVENTIONS_FILE
    if path.is_file():
        try:
            interventions = Interventions.from_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is not an interventions result ({type(err).__name__}: {err}); write "
                "it again with `icl-lens run --interventions`, or delete it to report "
                "without the interventions"
            ) from err
    path = directory / TRANSPLANT_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            _require_keys(data, VIEW_KEYS["meta_gradients"], TRANSPLANT_FILE)
            transplant = MetaGradients.from_dict(data)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is not valid view data ({err}); write it again with "
                "icl_lens.views.run_data.save_transplant_view(DIR, model, result), or "
                "delete it to report without the transplant view"
            ) from err
        if transplant.kind != "transplant":
            raise ValueError(
                f"{path} holds the ICL forward's meta-gradients, not a transplant: write it "
                "with icl_lens.views.run_data.save_transplant_view(DIR, model, result)"
            )
    return interventions, transplant
