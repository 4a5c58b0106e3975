"""Layer x head heatmaps: of a decomposition (attention mass on demonstrations, the
relaxation gap, ``|dW_ICL q| / |W_ZSL q|``, the label effect) and of the per-head
metrics of a comparison (SimAM per head), as matplotlib figures and as a view.

>>> frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
...                       "demo_mass": [.1, .5, .2, .9], "relax_cos": [.9, .8, .7, .6],
...                       "icl_norm_ratio": [1., 2., 3., 4.]})
>>> fig = plot_decomposition_heads(frame)
>>> [" ".join(ax.get_title().split()) for ax in fig.axes if ax.images][1:]
['relaxation gap 1 - cos(relaxed, softmax)', '|dW_ICL q| / |W_ZSL q|']
>>> fig.axes[0].images[0].get_array().tolist()
[[0.1, 0.5], [0.2, 0.9]]
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import pandas as pd
from matplotlib.figure import Figure

from icl_lens.analyses import with_head_labels
from icl_lens.views.figures import heatmap, metric_pairs, new_figure, pair_title, panel_size, svg
from icl_lens.views.page import Markup, View, render

__all__ = [
    "OVERVIEW_COLUMNS",
    "head_summary",
    "metric_grids",
    "overview_view",
    "plot_decomposition_heads",
    "plot_metric_heads",
]

OVERVIEW_COLUMNS = {
    "demo_mass": "attention mass on demonstrations",
    "relax_gap": "relaxation gap 1 - cos(relaxed, softmax)",
    "icl_norm_ratio": "|dW_ICL q| / |W_ZSL q|",
    "icl_effect": "dW_ICL q effect on the label logit difference",
}
PER_HEAD_METRICS = ("simam", "simaou", "kendall")


def head_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean per (layer, head) of a :meth:`Decomposition.to_frame` frame (over
    positions, or over queries when frames of several prompts are concatenated), with
    ``relax_gap = 1 - relax_cos`` and the ``head_label`` ``L{layer}H{head}``."""
    cols = [
        c
        for c in frame.columns
        if c not in ("layer", "head", "position", "query", "head_label")
        and pd.api.types.is_numeric_dtype(frame[c])
    ]
    out = frame.groupby(["layer", "head"], as_index=False)[cols].mean()
    if "relax_cos" in out:
        out["relax_gap"] = 1.0 - out["relax_cos"]
    return with_head_labels(out)


def _names(names: Sequence[str] | None, what: str, example: str) -> None:
    """Refuse one name where a list belongs (its characters would be read as names)."""
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list of names, e.g. {what}={example}; got {names!r}")


def _grids(frame: pd.DataFrame, columns: Sequence[str] | None) -> list[tuple[str, pd.DataFrame]]:
    _names(columns, "columns", f"[{columns!r}]")
    summary = head_summary(frame) if "relax_gap" not in frame else frame
    if columns is None:
        columns = [c for c in OVERVIEW_COLUMNS if c in summary]
    missing = [c for c in columns if c not in summary]
    if missing:
        numeric = [c for c in summary.columns if c not in ("layer", "head", "head_label")]
        raise KeyError(f"no column {missing} in the frame; choose from {numeric}")
    return [
        (OVERVIEW_COLUMNS.get(c, c), summary.pivot_table(index="layer", columns="head", values=c))
        for c in columns
    ]


def _grid_figure(grids: list[tuple[str, pd.DataFrame]], ncols: int | None) -> Figure:
    if ncols is not None and (
        isinstance(ncols, bool) or not isinstance(ncols, Integral) or ncols < 1
    ):
        raise ValueError(f"ncols must be a positive int (panels per row) or None, got {ncols!r}")
    fig, axes = new_figure(len(grids), panel=panel_size(grids[0][1]), ncols=ncols)
    for ax, (title, grid) in zip(axes, grids, strict=True):
        heatmap(ax, grid, title=title)
    return fig


def plot_decomposition_heads(
    frame: pd.DataFrame, columns: Sequence[str] | None = None, *, ncols: int | None = None
) -> Figure:
    """One layer x head heatmap per column of a decomposition frame
    (``dec.to_frame()``, averaged over positions, or :func:`head_summary` of it).
    Default columns: those of :data:`OVERVIEW_COLUMNS` the frame has; any numeric
    column can be asked for (``relax_gap`` is ``1 - relax_cos``)."""
    grids = _grids(frame, columns)
    if not grids:
        raise ValueError("nothing to plot: the frame has none of the requested columns")
    return _grid_figure(grids, ncols)


def metric_grids(
    metrics: pd.DataFrame, only: Sequence[str] | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """``(title, layer x head grid)`` of each metric and variant with per-head rows."""
    _names(only, "only", f"[{only!r}]")
    observed = metrics[
        (metrics["baseline"] == "none") & (metrics["layer"] >= 0) & (metrics["head"] >= 0)
    ]
    keep = PER_HEAD_METRICS if only is None else tuple(only)
    grids = []
    for metric, variant in metric_pairs(observed):
        if metric not in keep:
            continue
        rows = observed[(observed["metric"] == metric) & (observed["variant"] == variant)]
        grid = rows.pivot_table(index="layer", columns="head", values="value")
        grids.append((f"{pair_title(metric, variant)} per head", grid))
    return grids


def plot_metric_heads(
    metrics: pd.DataFrame, *, only: Sequence[str] | None = None, ncols: int | None = None
) -> Figure:
    """One layer x head heatmap per metric and variant with per-head rows in a tidy
    metrics frame (``Comparison.metrics()``): SimAM per head, in the paper's set."""
    grids = metric_grids(metrics, only)
    if not grids:
        raise ValueError(
            "no per-head rows to plot (layer >= 0, head >= 0): SimAM has them; SimAOU "
            "and Kendall are per layer (plot_layers)"
        )
    return _grid_figure(grids, ncols)


def overview_view(
    frame: pd.DataFrame | None = None,
    metrics: pd.DataFrame | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> View:
    """Layer x head heatmaps as a view: from a decomposition frame (``dec.to_frame()``
    or :func:`head_summary` of it) :func:`plot_decomposition_heads`; from a metrics
    frame (the tidy analyses format) :func:`plot_metric_heads`.

    >>> frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
    ...                       "demo_mass": [.1, .5, .2, .9], "relax_cos": [.9, .8, .7, .6]})
    >>> overview_view(frame).local_src.count("<svg")
    1
    """
    figures: list[Markup] = []
    if frame is not None and len(frame):
        figures.append(svg(plot_decomposition_heads(frame, columns)))
    if metrics is not None and len(metrics) and metric_grids(metrics):
        figures.append(svg(plot_metric_heads(metrics)))
    if not figures:
        return View("Nothing to show: no decomposition frame and no per-head metrics.")
    return View(render("overview.html.j2", figures=figures), title="icl-lens: overview")
