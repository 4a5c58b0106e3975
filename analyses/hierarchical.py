"""An interval that covers what varies: a hierarchical bootstrap over runs, then queries.

A metric from one run varies with its queries, but also with the demonstration set, their
order, or the random draw of a control, which a bootstrap over queries alone does not
see (on the demo, one redraw of the untrained control moved SimAOU by far more than the
query interval's width). :func:`hierarchical_bootstrap` takes per-query values of several
runs, each labelled by a key such as ``(seed, order)`` (outermost level first), and
resamples level by level: the first labels with replacement, within each drawn label the
next level's labels with replacement, and so on; then the queries.

The statistic is the nested mean: each run's summary (mean over queries per cell, then
heads, then layers, as :func:`~icl_lens.analyses.hierarchical_mean`), averaged within
each group of the deepest level, then those means within the next level up, and so on,
so every demonstration set weighs the same however many orders it has. A run whose
value is undefined (NaN) in a resample is left out of it.

Queries: ``shared_queries=True`` (the usual case: every run measures the same validation
queries) draws one query resample per bootstrap replicate for all runs, which keeps the
queries' own variance in the interval (a crossed design); ``False`` resamples each run's
queries independently (runs on different queries, e.g. different tasks).

With one run this is the query bootstrap of :func:`~icl_lens.analyses.bootstrap_ci`
(same resamples for the same seed).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> runs = {(s, o): rng.normal(0.1 * s, 0.05, size=40) for s in (1, 2, 3) for o in (0, 1)}
>>> r = hierarchical_bootstrap(runs, seed=0)
>>> round(r.value, 3), r.n_runs, r.n_groups
(0.199, 6, (3, 6))
>>> bool(r.ci[0] < 0.15 and r.ci[1] > 0.25)      # the seeds' spread, not the queries'
True
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .summary import ALL, Values, _as_3d, _levels, _nanmean, _quantiles, _resample_counts

__all__ = ["HierarchicalCI", "hierarchical_bootstrap", "hierarchical_table"]


@dataclass(frozen=True)
class HierarchicalCI:
    """The nested mean over runs, its bootstrap interval, and what it covered.

    ``n_groups``: distinct labels per level (the first level's count, then the number of
    distinct label paths down to each deeper level; the last equals ``n_runs``).
    """

    value: float
    ci: tuple[float, float]
    n_runs: int
    n_groups: tuple[int, ...]
    confidence: float = 0.95


def _run_stats(x: np.ndarray, w: np.ndarray | None) -> list[np.ndarray]:
    """A run's summary at every level (cells, layers, overall) under each row of query
    weights ``w`` (``None``: the run as it is), each with a leading replicate axis."""
    ok = ~np.isnan(x)
    x0 = np.where(ok, x, 0.0)
    n, n_layers, n_heads = x.shape
    if w is None:
        w = np.ones((1, n))
    num = (w @ x0.reshape(n, -1)).reshape(-1, n_layers, n_heads)
    den = (w @ ok.reshape(n, -1).astype(np.float64)).reshape(num.shape)
    return list(_levels(num, den))


def _tree(keys: Sequence[tuple]) -> list:
    """Nested lists of run indices grouped by successive key elements, in first-seen order."""

    def build(indices: list[int], depth: int):
        if depth == len(keys[0]):
            return indices[0] if len(indices) == 1 else _duplicate(keys[indices[0]])
        groups: dict[Hashable, list[int]] = {}
        for i in indices:
            groups.setdefault(keys[i][depth], []).append(i)
        return [build(members, depth + 1) for members in groups.values()]

    return build(list(range(len(keys))), 0)


def _duplicate(key: tuple):
    raise ValueError(f"two runs share the key {key!r}: every run needs its own label path")


def _nested_mean(node, values: np.ndarray) -> np.ndarray:
    """Nested mean over the run axis (0) of ``values``, skipping NaN at every level."""
    if isinstance(node, int):
        return values[node]
    return _nanmean(np.stack([_nested_mean(child, values) for child in node]), axis=0)


def _leaf_weights(tree, n_runs: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n_runs)`` weights of the nested resampling: a node drawn c times
    draws its children c * n_children times (the sum of c independent resamples), and a
    leaf's weight is its count over the product of the branch sizes on its path."""
    weights = np.zeros((n_resamples, n_runs))

    def walk(node, counts: np.ndarray, scale: float):
        if isinstance(node, int):
            weights[:, node] += counts / scale
            return
        k = len(node)
        drawn = rng.multinomial(counts * k, np.full(k, 1.0 / k))
        for j, child in enumerate(node):
            walk(child, drawn[:, j], scale * k)

    walk(tree, np.ones(n_resamples, dtype=np.int64), 1.0)
    return weights


def _count_groups(keys: Sequence[tuple]) -> tuple[int, ...]:
    return tuple(len({k[: d + 1] for k in keys}) for d in range(len(keys[0])))


def _hierarchical(runs, shared_queries, confidence, n_resamples, seed):
    if not runs:
        raise ValueError("a hierarchical bootstrap needs at least one run")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    keys = [k if isinstance(k, tuple) else (k,) for k in runs]
    if len({len(k) for k in keys}) != 1 or not keys[0]:
        raise ValueError(f"every run key needs the same number of labels, got {keys}")
    arrays = [_as_3d(v) for v in runs.values()]
    if len({a.shape[1:] for a in arrays}) != 1:
        raise ValueError(f"runs differ in layers/heads: {sorted({a.shape[1:] for a in arrays})}")
    sizes = {a.shape[0] for a in arrays}
    if shared_queries and len(sizes) != 1:
        raise ValueError(
            f"shared_queries needs the same queries in every run, got sizes {sorted(sizes)}; "
            "pass shared_queries=False for runs on different queries"
        )
    tree = _tree(keys)
    points = [np.stack([_run_stats(a, None)[lv][0] for a in arrays]) for lv in range(3)]
    point = [_nested_mean(tree, p) for p in points]

    reps = [np.full((n_resamples, len(arrays), *p.shape[1:]), np.nan) for p in points]
    for r, a in enumerate(arrays):
        n = a.shape[0]
        if n == 0:
            continue
        if shared_queries:
            w = _resample_counts(n, n_resamples, int(seed))
        else:
            idx = np.random.default_rng([int(seed), 1, r]).integers(0, n, size=(n_resamples, n))
            w = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
        for lv, stat in enumerate(_run_stats(a, w)):
            reps[lv][:, r] = stat
    lw = _leaf_weights(tree, len(arrays), n_resamples, np.random.default_rng([int(seed), 2]))
    ci = []
    for rep in reps:
        w = lw.reshape(lw.shape + (1,) * (rep.ndim - 2))
        ok = np.isfinite(rep) & (w > 0)
        num = np.where(ok, rep * w, 0.0).sum(axis=1)
        den = np.where(ok, np.broadcast_to(w, rep.shape), 0.0).sum(axis=1)
        stat = np.full(num.shape, np.nan)
        np.divide(num, den, out=stat, where=den > 0)
        ci.append(_quantiles(stat, confidence))
    return keys, arrays, point, ci


def hierarchical_bootstrap(
    runs: Mapping[tuple, Values],
    *,
    shared_queries: bool = True,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> HierarchicalCI:
    """Nested mean of several runs' per-query values and its hierarchical bootstrap CI.

    ``runs``: ``{key: values}``; every key a tuple of labels of the same length (e.g.
    ``(seed, order)``; a bare label counts as a 1-tuple), values ``(n,)``, ``(n, layer)``
    or ``(n, layer, head)`` per-query values (NaN: undefined, skipped), the same trailing
    shape in every run, and the same ``n`` with ``shared_queries``. Seeded.
    """
    keys, arrays, point, ci = _hierarchical(runs, shared_queries, confidence, n_resamples, seed)
    low, high = ci[2]
    return HierarchicalCI(
        value=float(point[2]),
        ci=(float(low), float(high)),
        n_runs=len(arrays),
        n_groups=_count_groups(keys),
        confidence=confidence,
    )


def hierarchical_table(
    runs: Mapping[tuple, Values],
    *,
    shared_queries: bool = True,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`hierarchical_bootstrap` at every level, as the rows of
    :func:`~icl_lens.analyses.summary_table`: ``layer, head, value, ci_low, ci_high,
    n_queries, n_skipped`` (overall, then per layer, then per head where the values have
    those axes). ``n_queries``: the most queries with a defined value in any run;
    ``n_skipped``: undefined values summed over the runs.

    >>> import numpy as np
    >>> runs = {(d,): np.full((4, 2), 0.1 * d) for d in (1, 2, 3)}
    >>> hierarchical_table(runs)[["layer", "value", "n_queries"]].round(6)
       layer  value  n_queries
    0     -1    0.2          4
    1      0    0.2          4
    2      1    0.2          4
    """
    keys, arrays, point, ci = _hierarchical(runs, shared_queries, confidence, n_resamples, seed)
    ndim = np.asarray(next(iter(runs.values()))).ndim
    ok = [~np.isnan(a) for a in arrays]
    n_q = [
        np.max([o.sum(axis=0) for o in ok], axis=0),
        np.max([o.any(axis=2).sum(axis=0) for o in ok], axis=0),
        max(int(o.any(axis=(1, 2)).sum()) for o in ok),
    ]
    n_sk = [
        np.sum([(~o).sum(axis=0) for o in ok], axis=0),
        np.sum([(~o).sum(axis=(0, 2)) for o in ok], axis=0),
        sum(int((~o).sum()) for o in ok),
    ]
    (cells, layers, overall), ((c_lo, c_hi), (l_lo, l_hi), (o_lo, o_hi)) = point, ci
    rows: list[tuple] = [(ALL, ALL, overall, o_lo, o_hi, n_q[2], n_sk[2])]
    if ndim >= 2:
        for la in range(layers.shape[0]):
            rows.append((la, ALL, layers[la], l_lo[la], l_hi[la], n_q[1][la], n_sk[1][la]))
    if ndim == 3:
        for la in range(cells.shape[0]):
            for h in range(cells.shape[1]):
                i = (la, h)
                rows.append((la, h, cells[i], c_lo[i], c_hi[i], n_q[0][i], n_sk[0][i]))
    frame = pd.DataFrame(
        rows, columns=["layer", "head", "value", "ci_low", "ci_high", "n_queries", "n_skipped"]
    )
    for col in ("value", "ci_low", "ci_high"):
        frame[col] = frame[col].astype(np.float64)
    for col in ("layer", "head", "n_queries", "n_skipped"):
        frame[col] = frame[col].astype(np.int64)
    return frame
