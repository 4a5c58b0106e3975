"""How much of ICL's effect an intervention recovers or removes: margins, shares, intervals.

Pure numpy on per-query values (docs/interventions.md). For each measured query, from the
logits of the label words at the prediction position:

- ``margin = logit[gold] - mean(logit[other label words])``, and
- ``correct = argmax over the label words == gold`` (the first on exact ties, as
  :class:`~icl_lens.study.predict.Predictions`).

A condition's value ``m`` is the mean of a metric over the queries. Its share of ICL's
effect is a ratio of means against a target T (ICL) and a baseline B (Blind, or ZSL for
FT and the task vector)::

    recovered(X) = (m(X) - m(B)) / (m(T) - m(B))
    removed(X)   = (m(T) - m(X)) / (m(T) - m(B))

Intervals: every condition is bootstrapped on the same query resamples
(:func:`~icl_lens.analyses.summary._resample_counts`, a paired bootstrap), so a ratio's
replicates divide means of one resample. Over several demonstration sets, the per-set
values and their shared-query replicates go to
:func:`~icl_lens.analyses.hierarchical.interval_over_sets`, the interval of the
comparison's tables; with one set it is the percentile interval of the replicates.
A share is undefined (NaN, flagged) where the interval of ``m(T) - m(B)`` includes 0:
ICL does not move the metric, and a ratio would divide noise by noise.

>>> import numpy as np
>>> logits = np.array([[[2.0, 0.0], [0.5, 0.0], [0.0, 0.0]],   # query 1: ICL, X, Blind
...                    [[0.0, 3.0], [0.0, 1.0], [0.0, 0.0]]])  # query 2 (gold 1)
>>> margin, correct = label_margins(logits, np.array([0, 1]))
>>> margin.tolist()
[[2.0, 0.5, 0.0], [3.0, 1.0, 0.0]]
>>> means = query_means([margin], n_resamples=200, seed=0)
>>> point, reps = share(means, 1, target=0, baseline=2, kind="recovered")
>>> float(point[0])    # (0.75 - 0) / (2.5 - 0)
0.3
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .hierarchical import interval_over_sets, run_tree
from .summary import _resample_counts

__all__ = [
    "KINDS",
    "SetMeans",
    "effect_interval",
    "label_margins",
    "query_means",
    "set_interval",
    "share",
]

KINDS = ("recovered", "removed")


def label_margins(label_logits: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``margin`` and ``correct`` (as 0.0 / 1.0) of every query under every condition.

    ``label_logits``: ``(query, ..., class)`` logits (or log-probabilities: the margin
    and the argmax do not change when a row is shifted) of each class's label word;
    ``gold``: ``(query,)`` class indices. Returns two ``(query, ...)`` arrays.
    """
    x = np.asarray(label_logits, dtype=np.float64)
    gold = np.asarray(gold)
    n_class = x.shape[-1]
    if n_class < 2:
        raise ValueError(f"a margin needs at least 2 label words, got {n_class}")
    if x.shape[0] != len(gold) or gold.ndim != 1:
        raise ValueError(f"gold must be one class per query ({x.shape[0]}), got {gold.shape}")
    if ((gold < 0) | (gold >= n_class)).any():
        raise ValueError(f"gold classes must lie in [0, {n_class}), got {sorted(set(gold))}")
    if not np.isfinite(x).all():
        raise ValueError("the label logits hold NaN or infinite values: the model is broken")
    index = gold.reshape((-1,) + (1,) * (x.ndim - 1))
    own = np.take_along_axis(x, index, axis=-1)[..., 0]
    others = (x.sum(axis=-1) - own) / (n_class - 1)
    correct = (x.argmax(axis=-1) == index[..., 0]).astype(np.float64)
    return own - others, correct


@dataclass(frozen=True)
class SetMeans:
    """Per demonstration set and condition: the mean over queries (``point``, ``(set,
    condition)``) and the same under the shared query resamples (``reps``, ``(resample,
    set, condition)``)."""

    point: np.ndarray
    reps: np.ndarray
    n_queries: int

    @property
    def n_sets(self) -> int:
        return self.point.shape[0]


def query_means(
    values: Sequence[np.ndarray], *, n_resamples: int = 1000, seed: int = 0
) -> SetMeans:
    """Means over queries of each set's ``(query, condition)`` values, and their
    replicates on the same resamples in every set (every set measures the same
    queries)."""
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    sizes = {a.shape for a in arrays}
    if not arrays or len(sizes) != 1 or arrays[0].ndim != 2:
        raise ValueError(
            f"every set needs the same (query, condition) values, got shapes {sorted(sizes)}"
        )
    n = arrays[0].shape[0]
    if n < 1:
        raise ValueError("no queries to average")
    w = _resample_counts(n, int(n_resamples), int(seed)) / n
    point = np.stack([a.mean(axis=0) for a in arrays])
    reps = np.stack([w @ a for a in arrays], axis=1)
    return SetMeans(point, reps, n)


def share(
    means: SetMeans, x, *, target: int, baseline: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``recovered`` or ``removed`` of conditions ``x`` (an index or index array into the
    condition axis) against ``target`` and ``baseline`` (condition indices): per set
    ``(set, ...)`` and per replicate ``(resample, set, ...)``. A condition equal to the
    target (or, removed, to the baseline) gives exactly 1."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def ratio(m):
        t, b, v = m[..., target], m[..., baseline], m[..., x]
        if np.ndim(x):
            t, b = t[..., None], b[..., None]
        top = v - b if kind == "recovered" else t - v
        with np.errstate(divide="ignore", invalid="ignore"):
            return top / (t - b)

    return ratio(means.point), ratio(means.reps)


def set_interval(
    point: np.ndarray, reps: np.ndarray, n_queries: int, *, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Value, low, high and defined sets of per-set statistics ``point`` ``(set, ...)``
    with replicates ``reps`` ``(resample, set, ...)`` on shared query resamples: the
    nested mean over sets and :func:`interval_over_sets` (one set: the percentile
    interval)."""
    tree = run_tree([(i,) for i in range(point.shape[0])])
    n_q = np.full(point.shape[1:], n_queries)
    return interval_over_sets(tree, point, reps, n_q, True, confidence)


def effect_interval(
    means: SetMeans, *, target: int, baseline: int, confidence: float = 0.95
) -> dict[str, np.ndarray]:
    """ICL's effect ``m(target) - m(baseline)``: per set (``per_set``, ``per_set_low``,
    ``per_set_high``, each ``(set,)``), over the sets (``value``, ``low``, ``high``), and
    ``defined``: whether its interval leaves out 0, per set (``per_set_defined``) and
    overall."""
    diff = means.point[:, target] - means.point[:, baseline]
    reps = means.reps[:, :, target] - means.reps[:, :, baseline]
    value, low, high, _ = set_interval(
        diff[:, None], reps[:, :, None], means.n_queries, confidence=confidence
    )
    alpha = (1.0 - confidence) / 2.0
    s_low, s_high = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    return {
        "per_set": diff,
        "per_set_low": s_low,
        "per_set_high": s_high,
        "per_set_defined": (s_low > 0) | (s_high < 0),
        "value": float(value[0]),
        "low": float(low[0]),
        "high": float(high[0]),
        "defined": bool(low[0] > 0 or high[0] < 0),
    }
