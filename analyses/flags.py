"""When a number cannot speak: flags for values that carry no evidence either way.

- :func:`rec2ftp_flag`: Rec2FTP is fixed by the accuracies, whatever the two methods
  share, when ICL is right on all (or none) of the queries ZSL gets wrong (it is then 1
  (or 0)), or FT is right on all of them (it then equals its independent baseline), or
  it is undefined (ZSL is never wrong, or FT fixes nothing). An ICL or FT accuracy of 0%
  or 100% is one of these cases.
- :func:`indistinguishable`: a value whose interval overlaps the interval of a shuffled
  pairing (or Rec2FTP's independent baseline) is not distinguishable from what
  unrelated queries or heads give.
- :func:`interval_flags`: an interval that does not cover what it claims to: from fewer
  than :data:`MIN_QUERIES` queries, or over runs from a single demonstration set.
- :func:`undefined_notes`: why a metric's values were left out (NaN), per row: a layer
  that sees no demonstration token, a top-k with k not below the items, a change at
  rounding level (the reasons each metric records in ``MetricResult.undefined``).

>>> import pandas as pd
>>> frame = pd.DataFrame({
...     "metric": ["simaou"] * 2, "variant": ["normalised"] * 2,
...     "baseline": ["none", "shuffled_queries"], "layer": [-1, -1], "head": [-1, -1],
...     "value": [0.50, 0.45], "ci_low": [0.40, 0.42], "ci_high": [0.60, 0.48]})
>>> indistinguishable(frame).tolist()
['not distinguishable from shuffled_queries', None]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .rec2ftp import Rec2FTPResult
from .result import OBSERVED, MetricResult
from .summary import ALL

__all__ = [
    "MIN_QUERIES",
    "NULL_BASELINES",
    "indistinguishable",
    "interval_flags",
    "join_flags",
    "rec2ftp_flag",
    "undefined_notes",
]

NULL_BASELINES = ("shuffled_queries", "shuffled_heads", "independent")
"""Baselines a value must be told apart from to mean anything about ICL and FT."""

MIN_QUERIES = 20
"""Fewer queries than this and an interval is flagged: a 95% percentile bootstrap over n
queries covered the mean of normal values in 90% of 2000 simulated samples at n = 10,
83% at 5, 74% at 3 and 51% at 2 (92% at 20; docs/method.md, "Intervals")."""


def rec2ftp_flag(result: Rec2FTPResult) -> str | None:
    """Why a Rec2FTP value says nothing about ICL and FT fixing the same queries, or None.

    >>> from icl_lens.analyses import rec2ftp
    >>> rec2ftp_flag(rec2ftp(zsl=[0, 0, 1], icl=[1, 1, 1], ft=[1, 0, 1]))
    'uninformative: ICL is right on every query ZSL gets wrong, so Rec2FTP is 1 whatever FT does'
    >>> rec2ftp_flag(rec2ftp(zsl=[0, 0, 0, 1], icl=[1, 0, 1, 1], ft=[1, 0, 0, 1])) is None
    True
    """
    wrong, icl, ft = result.n_zsl_wrong, result.n_icl_recovered, result.n_ft_recovered
    if wrong == 0:
        return "undefined: ZSL gets every query right"
    if ft == 0:
        return "undefined: FT fixes none of the queries ZSL gets wrong"
    if icl == wrong:
        return (
            "uninformative: ICL is right on every query ZSL gets wrong, so Rec2FTP is 1 "
            "whatever FT does"
        )
    if icl == 0:
        return (
            "uninformative: ICL is right on none of the queries ZSL gets wrong, so Rec2FTP "
            "is 0 whatever FT does"
        )
    if ft == wrong:
        return (
            "uninformative: FT is right on every query ZSL gets wrong, so Rec2FTP equals "
            "its independent baseline"
        )
    if result.n_both * wrong == icl * ft:
        return "uninformative: equal to its independent baseline"
    return None


def indistinguishable(
    frame: pd.DataFrame,
    *,
    against: Sequence[str] = NULL_BASELINES,
    by: Sequence[str] | None = None,
) -> pd.Series:
    """Per row of a tidy metric frame: for an observed row (``baseline == "none"``) whose
    ``[ci_low, ci_high]`` overlaps the interval of one of the ``against`` baselines in the
    same metric, variant, layer and head (and ``by`` columns, default: every non-numeric
    column beyond them, e.g. ``ft_mode``), the text ``"not distinguishable from <names>"``;
    None otherwise. Rows without an interval are never flagged."""
    keys = ["metric", "variant", "layer", "head"]
    if by is None:
        skip = {*keys, "baseline", "flag", "head_label"}
        by = [c for c in frame.columns if c not in skip and frame[c].dtype == object]
    keys += list(by)
    obs = frame[frame["baseline"] == OBSERVED]
    nulls = frame[frame["baseline"].isin(list(against))]
    out = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    if obs.empty or nulls.empty:
        return out
    merged = (
        obs[keys + ["ci_low", "ci_high"]]
        .reset_index()
        .merge(nulls[keys + ["baseline", "ci_low", "ci_high"]], on=keys, suffixes=("", "_null"))
    )
    overlap = (merged["ci_low"] <= merged["ci_high_null"]) & (
        merged["ci_low_null"] <= merged["ci_high"]
    )
    order = {name: i for i, name in enumerate(against)}
    for index, names in merged[overlap].groupby("index")["baseline"]:
        names = sorted(set(names), key=order.__getitem__)
        out[index] = "not distinguishable from " + ", ".join(names)
    return out


def interval_flags(frame: pd.DataFrame, *, min_queries: int = MIN_QUERIES) -> pd.Series:
    """Per row of a tidy metric frame: why an observed row's (``baseline == "none"``)
    interval does not cover what it claims, or None. ``n_queries`` below ``min_queries``:
    too few queries for the interval to hold; ``n_sets`` (a frame over runs, e.g.
    :meth:`~icl_lens.study.runs.ComparisonSet.table`) of 1: the interval covers queries
    (and orders), not other demonstration sets. Rows without an interval are never
    flagged.

    >>> frame = pd.DataFrame({"baseline": ["none", "none"], "value": [0.5, 0.2],
    ...     "ci_low": [0.5, 0.1], "ci_high": [0.5, 0.3], "n_queries": [1, 64]})
    >>> interval_flags(frame).tolist()
    ['interval from 1 query: too few for it to hold (fewer than 20)', None]
    """
    out = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    shown = (frame["baseline"] == OBSERVED) & frame["ci_low"].notna() & frame["ci_high"].notna()
    n_sets = frame["n_sets"] if "n_sets" in frame else pd.Series(2, index=frame.index)
    for i in frame.index[shown]:
        notes = []
        if n_sets[i] == 1:
            notes.append("1 demonstration set: the interval does not cover other sets")
        n = int(frame.at[i, "n_queries"])
        if n < min_queries:
            noun = "query" if n == 1 else "queries"
            notes.append(
                f"interval from {n} {noun}: too few for it to hold (fewer than {min_queries})"
            )
        out[i] = "; ".join(notes) or None
    return out


def join_flags(*flags: pd.Series) -> pd.Series:
    """Row-wise ``"; "``-joined text of several flag series (None where all are None)."""
    frame = pd.concat(flags, axis=1)
    texts = ["; ".join(x for x in row if isinstance(x, str) and x) or None for row in frame.values]
    return pd.Series(texts, index=frame.index, dtype=object)


def _metric_results(result: Any) -> list[MetricResult]:
    """The :class:`MetricResult` s behind a result, in its ``to_frame()`` row order."""
    result = getattr(result, "result", result)  # Rec2FTPResult wraps one
    variants = getattr(result, "variants", None)
    return list(variants.values()) if variants else [result]


def _note(marked: np.ndarray, reason: str, whole_layer_rows: bool) -> str | None:
    """The note of one row whose values (``(n, layer, head)`` scope) ``marked`` leaves out."""
    count, total = int(marked.sum()), marked.size
    if count == 0:
        return None
    if count == total:
        return f"undefined: {reason}"
    if whole_layer_rows:
        out = [layer for layer in range(marked.shape[1]) if marked[:, layer].all()]
        if out:
            others = total - sum(marked[:, layer].size for layer in out)
            rest = count - (total - others)
            names = ", ".join(map(str, out))
            more = f"; {rest} of the other layers' {others} values too" if rest else ""
            return (
                f"layer{'s' if len(out) > 1 else ''} {names} left out of the mean{more}: {reason}"
            )
    return f"{count} of {total} values left out: {reason}"


def undefined_notes(*results: Any) -> pd.Series:
    """Per row of :func:`~icl_lens.analyses.results_frame` of ``results``: on an observed
    row, why some of its values are undefined and left out (``"undefined: ..."`` where all
    are; which layers left the overall mean; how many values otherwise), from the reasons
    each metric recorded; None elsewhere.

    >>> from icl_lens.analyses import topk_recall
    >>> scores = [np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf]])]  # 2 layers
    >>> notes = undefined_notes(topk_recall(scores, scores, k=1))
    >>> [n for n in notes if n]      # doctest: +NORMALIZE_WHITESPACE
    ['layer 1 left out of the mean: the layer sees no demonstration token from the
      recorded position (all outside its sliding window)',
     'undefined: the layer sees no demonstration token from the recorded position (all
      outside its sliding window)']
    """
    notes: list[str | None] = []
    for result in results:
        for r in _metric_results(result):
            frame = r.to_frame()
            marks = {reason: _as_3d(mask) for reason, mask in r.undefined.items()}
            for baseline, layer, head in zip(
                frame["baseline"], frame["layer"], frame["head"], strict=True
            ):
                texts = []
                if baseline == OBSERVED:
                    for reason, mask in marks.items():
                        scope = mask if layer == ALL else mask[:, layer : layer + 1]
                        scope = scope if head == ALL else scope[:, :, head : head + 1]
                        text = _note(scope, reason, layer == ALL and mask.shape[1] > 1)
                        if text:
                            texts.append(text)
                notes.append("; ".join(texts) or None)
    return pd.Series(notes, dtype=object)


def _as_3d(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (3 - mask.ndim))
