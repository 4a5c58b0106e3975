"""Summaries: means over queries, bootstrap confidence intervals, spreads over runs.

Per-query values come as arrays of shape ``(n,)``, ``(n, layer)`` or
``(n, layer, head)``; NaN marks a value that is undefined (a zero update, a constant
vector) and is skipped and counted, never silently averaged in.

The summary statistic is the paper's order of means: mean over queries for each cell
(layer, head), then over heads, then over layers. Without NaNs this equals the plain
mean of all values.

The bootstrap resamples *queries* (all layers and heads of a query move together), and
recomputes that same statistic on each resample: a seeded percentile bootstrap.

>>> import numpy as np
>>> values = np.array([[0.1, 0.3], [0.2, 0.4], [0.3, 0.5]])   # 3 queries, 2 layers
>>> round(hierarchical_mean(values), 6)
0.3
>>> low, high = bootstrap_ci(values, seed=0)
>>> bool(low <= 0.3 <= high)
True
>>> summary_table(values)[["layer", "head", "value", "n_queries"]].round(6)
   layer  head  value  n_queries
0     -1    -1    0.3          3
1      0    -1    0.2          3
2      1    -1    0.4          3
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

#: Row index used for "all layers" / "all heads" (mean over them) or "not applicable".
ALL = -1

#: Columns of every metric frame, in order.
FRAME_COLUMNS = (
    "metric",
    "variant",
    "baseline",
    "layer",
    "head",
    "value",
    "ci_low",
    "ci_high",
    "n_queries",
    "n_skipped",
)
#: The range each metric's values lie in (cosines and Kendall's tau in [-1, 1], fractions
#: in [0, 1]): an interval is cut there.
VALUE_RANGES = {
    "rec2ftp": (0.0, 1.0),
    "simaou": (-1.0, 1.0),
    "simam": (-1.0, 1.0),
    "kendall": (-1.0, 1.0),
    "topk_recall": (0.0, 1.0),
}
#: Columns holding per-run statistics or notes (never grouping keys in :func:`aggregate_runs`).
STAT_COLUMNS = ("value", "ci_low", "ci_high", "n_queries", "n_skipped", "flag")

Values = Float[np.ndarray, "n ..."]


def head_label(layer: int, head: int) -> str:
    """TransformerLens's name of a head (as ``ActivationCache.stack_head_results``):
    ``L{layer}H{head}``; ``L{layer}`` for a whole layer (head ``ALL``), ``all`` for the
    whole model (layer ``ALL``).

    >>> head_label(3, 1), head_label(3, ALL), head_label(ALL, ALL)
    ('L3H1', 'L3', 'all')
    """
    if layer < 0:
        return "all"
    return f"L{layer}" if head < 0 else f"L{layer}H{head}"


def with_head_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with a ``head_label`` column (:func:`head_label` of its
    ``layer`` and ``head``) right after ``head``; the frame as it is if it has one."""
    if "head_label" in frame:
        return frame.copy()
    out = frame.copy()
    labels = [head_label(int(la), int(h)) for la, h in zip(out["layer"], out["head"], strict=True)]
    out.insert(out.columns.get_loc("head") + 1, "head_label", labels)
    return out


def _as_3d(values: Any) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        return x[:, None, None]
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim == 3:
        return x
    raise ValueError(
        f"expected per-query values of shape (n,), (n, layer) or (n, layer, head); got {x.shape}"
    )


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` skipping NaN; NaN (no warning) where nothing is left."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    out = np.full(count.shape, np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def _levels(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell means from sums and counts, then mean over heads, then over layers."""
    cells = np.full(num.shape, np.nan)
    np.divide(num, den, out=cells, where=den > 0)
    layers = _nanmean(cells, axis=-1)
    overall = _nanmean(layers, axis=-1)
    return cells, layers, overall


@functools.lru_cache(maxsize=2)
def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """How often each query appears in each bootstrap resample: (n_resamples, n).

    The same (n, n_resamples, seed) always gives the same resamples, so a metric and its
    baselines are bootstrapped on the same query resamples (a paired comparison).
    """
    rng = np.random.default_rng([int(seed), 0])
    idx = rng.integers(0, n, size=(n_resamples, n))
    idx += np.arange(n_resamples)[:, None] * n
    counts = np.bincount(idx.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)
    counts = counts.astype(np.float64)
    counts.setflags(write=False)
    return counts


def _quantiles(reps: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - confidence) / 2.0
    qs = [alpha, 1.0 - alpha]
    flat = reps.reshape(reps.shape[0], -1)
    low, high = np.quantile(flat, qs, axis=0)  # vectorised; NaN wherever a rep is NaN
    has_nan = np.isnan(flat).any(axis=0)
    if has_nan.any():  # only those cells need the (slow) NaN-skipping quantile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
            low[has_nan], high[has_nan] = np.nanquantile(flat[:, has_nan], qs, axis=0)
    return low.reshape(reps.shape[1:]), high.reshape(reps.shape[1:])


def _summarize(values: Any, confidence: float, n_resamples: int, seed: int) -> dict[str, Any]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    x = _as_3d(values)
    n, n_layers, n_heads = x.shape
    ok = ~np.isnan(x)
    x0 = np.where(ok, x, 0.0)
    point = _levels(x0.sum(axis=0), ok.sum(axis=0).astype(np.float64))
    if n == 0:
        ci = [(np.full_like(p, np.nan), np.full_like(p, np.nan)) for p in point]
    else:
        w = _resample_counts(n, n_resamples, int(seed))
        num = (w @ x0.reshape(n, -1)).reshape(n_resamples, n_layers, n_heads)
        if ok.all():  # every resample holds n queries per cell
            den = np.full(num.shape, float(n))
        else:
            den = (w @ ok.reshape(n, -1).astype(np.float64)).reshape(num.shape)
        ci = [_quantiles(r, confidence) for r in _levels(num, den)]
    return {
        "ndim": np.asarray(values).ndim,
        "point": point,
        "ci": ci,
        "n_queries": (ok.sum(axis=0), ok.any(axis=2).sum(axis=0), ok.any(axis=(1, 2)).sum()),
        "n_skipped": ((~ok).sum(axis=0), (~ok).sum(axis=(0, 2)), (~ok).sum()),
    }


def hierarchical_mean(values: Values) -> float:
    """The summary value: mean over queries per cell, then over heads, then layers.

    NaN values are skipped; NaN if no value is defined.
    """
    return float(_summarize(values, 0.95, 1, 0)["point"][2])


def bootstrap_ci(
    values: Values,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`hierarchical_mean`, resampling queries.

    ``values``: ``(n,)``, ``(n, layer)`` or ``(n, layer, head)`` per-query values (NaN
    skipped). Seeded, so the same inputs always give the same interval; resamples in
    which no value is defined are left out of the percentiles.
    """
    s = _summarize(values, confidence, n_resamples, seed)
    low, high = s["ci"][2]
    return float(low), float(high)


def summary_table(
    values: Values,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Point value, bootstrap CI and counts at every level, as a tidy frame.

    Columns: ``layer, head, value, ci_low, ci_high, n_queries, n_skipped``. Rows, in
    order: the overall summary (``layer = head = -1``); one row per layer
    (``head = -1``: mean over heads, or no heads) when ``values`` has a layer axis; one
    row per (layer, head) when it has a head axis. ``n_queries`` counts queries with at
    least one defined value in the row's scope; ``n_skipped`` counts undefined (NaN)
    per-query values in that scope.
    """
    s = _summarize(values, confidence, n_resamples, seed)
    (cells, layers, overall) = s["point"]
    (c_lo, c_hi), (l_lo, l_hi), (o_lo, o_hi) = s["ci"]
    (c_n, l_n, o_n), (c_sk, l_sk, o_sk) = s["n_queries"], s["n_skipped"]
    rows: list[tuple] = [(ALL, ALL, overall, o_lo, o_hi, o_n, o_sk)]
    if s["ndim"] >= 2:
        for layer in range(layers.shape[0]):
            rows.append(
                (layer, ALL, layers[layer], l_lo[layer], l_hi[layer], l_n[layer], l_sk[layer])
            )
    if s["ndim"] == 3:
        for layer in range(cells.shape[0]):
            for head in range(cells.shape[1]):
                i = (layer, head)
                rows.append((layer, head, cells[i], c_lo[i], c_hi[i], c_n[i], c_sk[i]))
    frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS[3:]))
    for col in ("value", "ci_low", "ci_high"):
        frame[col] = frame[col].astype(np.float64)
    for col in ("layer", "head", "n_queries", "n_skipped"):
        frame[col] = frame[col].astype(np.int64)
    return frame


def results_frame(*results: Any) -> pd.DataFrame:
    """Concatenate the ``to_frame()`` of several metric results into one tidy frame.

    >>> from icl_lens.analyses import rec2ftp
    >>> r = rec2ftp(zsl=[0, 0, 1], icl=[1, 0, 1], ft=[1, 1, 1])
    >>> results_frame(r).shape[1] == len(FRAME_COLUMNS)
    True
    """
    if not results:
        return pd.DataFrame(columns=list(FRAME_COLUMNS))
    return pd.concat([r.to_frame() for r in results], ignore_index=True)


def aggregate_runs(
    frames: pd.DataFrame | Mapping[Any, pd.DataFrame] | Sequence[pd.DataFrame],
    *,
    over: str | Iterable[str] = "run",
    by: Iterable[str] | None = None,
    value: str = "value",
) -> pd.DataFrame:
    """Spread of a metric over seeds / demonstration orders: mean, std, min, max, n.

    ``frames``: one frame per run as a mapping ``{run label: frame}`` or a sequence
    (labelled 0, 1, ...), in which case the runs are told apart by a column ``run``;
    or one concatenated frame whose runs are told apart by the column(s) ``over``
    (e.g. ``over=["seed", "order"]``). Rows are grouped by ``by``: by default every
    column except ``over`` and the per-run statistics (value, CI bounds, counts), i.e.
    ``metric, variant, baseline, layer, head`` plus any label columns the caller added
    (task, model, ...). Each group must hold at most one row per run.

    Returns the ``by`` columns, then ``mean, std, min, max, n``: ``std`` is the sample
    standard deviation (ddof=1; NaN for a single run) and ``n`` the number of runs with
    a defined value (NaN values are skipped).

    >>> import pandas as pd
    >>> runs = {s: pd.DataFrame({"metric": ["simaou"], "layer": [-1], "value": [v]})
    ...         for s, v in [(1, 0.2), (2, 0.4)]}
    >>> aggregate_runs(runs).round(4)
       metric  layer  mean     std  min  max  n
    0  simaou     -1   0.3  0.1414  0.2  0.4  2
    """
    if isinstance(frames, pd.DataFrame):
        df = frames
        over_cols = [over] if isinstance(over, str) else list(over)
    else:
        items = frames.items() if isinstance(frames, Mapping) else enumerate(frames)
        parts = [f.assign(run=label) for label, f in items]
        if not parts:
            raise ValueError("aggregate_runs needs at least one frame")
        df = pd.concat(parts, ignore_index=True)
        over_cols = ["run"]
    missing = [c for c in [*over_cols, value] if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the frame (columns: {list(df.columns)})")
    if by is None:
        skip = {*over_cols, value, *STAT_COLUMNS}
        by_cols = [c for c in df.columns if c not in skip]
    else:
        by_cols = list(by)
    if df.duplicated(subset=[*by_cols, *over_cols]).any():
        raise ValueError(
            f"several rows per run share the same {by_cols}: add the column that tells them "
            "apart to `by`, or the column that tells runs apart to `over`"
        )
    grouped = df.groupby(by_cols, sort=False, dropna=False)[value]
    out = grouped.agg(["mean", "std", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "n"})
