"""matplotlib figures of a comparison, for a paper or the offline report.

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot (no global
state; safe to build many): save it with ``fig.savefig("x.pdf")``; in a notebook it
displays itself. The report embeds the same figures as inline SVG (:func:`svg`), text
kept as text, with a fixed hash salt and no date, so a page is reproducible and fetches
no font.

- :func:`plot_layers`: each metric per layer, its 95% interval as a band and its
  baselines as dashed lines (``Comparison.plot_layers``);
- :func:`heatmap`: a layer x head grid on one Axes (:mod:`icl_lens.views.heatmaps`
  composes them: ``Comparison.plot_heads``, ``Decomposition.plot_heads``);
- :func:`plot_accuracy`: ZSL / ICL / FT accuracy bars, with the untrained-weights control.

>>> from icl_lens import analyses
>>> outs = np.random.default_rng(0).standard_normal((3, 6, 2, 8))  # zsl, icl, ft outputs
>>> fig = plot_layers(analyses.simaou(*outs, n_resamples=50).normalised.to_frame())
>>> [ax.get_title() for ax in fig.axes]
['SimAOU (normalised)']
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from icl_lens.files import atomic_write_text
from icl_lens.study.comparison import PAPER_VARIANT
from icl_lens.views.page import SETTING_NAMES

__all__ = [
    "METRIC_TITLES",
    "NotebookFigure",
    "heatmap",
    "metric_pairs",
    "new_figure",
    "plot_accuracy",
    "plot_layers",
    "save_svg",
    "svg",
]

METRIC_ORDER = ("rec2ftp", "simaou", "simam", "kendall")
METRIC_TITLES = {
    "rec2ftp": "Rec2FTP",
    "simaou": "SimAOU",
    "simam": "SimAM",
    "kendall": "Kendall",
    "topk_recall": "Top-k recall",
}
VALUE_COLOR = "#2b6cb0"
NAN_COLOR = "#e2e8f0"
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 7,
    "legend.frameon": False,
}
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "icl-lens", "svg.image_inline": True}


class NotebookFigure(Figure):
    """A :class:`~matplotlib.figure.Figure` that shows itself in Jupyter as a PNG even
    when pyplot was never imported (figures built without pyplot otherwise print as
    ``<Figure size ...>``)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=110)
        return buf.getvalue()


def new_figure(n_panels: int, *, panel: tuple[float, float], ncols: int | None = None):
    """A figure with ``n_panels`` Axes in a grid (``ncols`` per row, default: as many as
    fit in about 11 inches), constrained layout; returns ``(figure, axes)``."""
    if ncols is None:
        ncols = max(1, min(n_panels, int(11 // panel[0])))
    nrows = max(1, math.ceil(n_panels / ncols))
    with matplotlib.rc_context(STYLE):
        fig = NotebookFigure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def text(value: object) -> str:
    """A data string as matplotlib shows it literally (``$`` would start mathtext)."""
    return str(value).replace("$", r"\$")


def svg(fig: Figure) -> Markup:
    """The figure as an inline ``<svg>`` element for an HTML page: text as text (no
    font is embedded or fetched), fixed ids, no date; matplotlib escapes every string.
    """
    buf = io.StringIO()
    with matplotlib.rc_context(SVG_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "icl-lens"})
    out = buf.getvalue()
    return Markup(out[out.index("<svg") :])


def save_svg(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as a standalone SVG file, reproducibly and atomically."""
    buf = io.StringIO()
    with matplotlib.rc_context(SVG_STYLE):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "icl-lens"})
    return atomic_write_text(path, buf.getvalue())


def metric_pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The ``(metric, variant)`` pairs of a tidy metrics frame: the paper's four in
    order, the paper's variant first, then anything else in the frame's order."""
    pairs = list(dict.fromkeys(zip(frame["metric"], frame["variant"], strict=True)))

    def key(p: tuple[str, str]) -> tuple[int, int]:
        metric, variant = p
        rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
        return rank, 0 if PAPER_VARIANT.get(metric) == variant else 1

    return sorted(pairs, key=key)


def pair_title(metric: str, variant: str) -> str:
    return f"{METRIC_TITLES.get(metric, metric)} ({variant})"


# ---------------------------------------------------------------------------------------
# Per layer
# ---------------------------------------------------------------------------------------


def plot_layers(
    metrics: pd.DataFrame,
    *,
    only: Sequence[str] | None = None,
    ncols: int | None = None,
) -> Figure:
    """Each metric per layer: the value (line and points), its 95% bootstrap interval
    (band) and every baseline (dashed, one colour per baseline across panels), one panel
    per metric and variant that has per-layer rows.

    ``metrics``: the tidy frame (``Comparison.metrics()``); ``only``: metric names to
    keep (e.g. ``["simaou", "kendall"]``).

    >>> from icl_lens import analyses
    >>> outs = np.random.default_rng(0).standard_normal((3, 6, 2, 8))  # zsl, icl, ft outputs
    >>> frame = analyses.simaou(*outs, n_resamples=50).to_frame()
    >>> fig = plot_layers(frame, only=["simaou"])
    >>> [ax.get_title() for ax in fig.axes]
    ['SimAOU (normalised)', 'SimAOU (unnormalised)']
    >>> value = [line for line in fig.axes[0].lines if line.get_label() == "value"][0]
    >>> value.get_xdata().tolist(), fig.axes[0].get_xticklabels()[1].get_text()
    ([0, 1], 'L1')
    """
    rows = metrics[(metrics["layer"] >= 0) & (metrics["head"] < 0)]
    if only is not None:
        rows = rows[rows["metric"].isin(list(only))]
    pairs = metric_pairs(rows)
    if not pairs:
        raise ValueError(
            "no per-layer rows to plot (layer >= 0, head == -1); per-layer values come "
            "from metrics over (query, layer) or (query, layer, head) arrays"
        )
    names = [b for b in dict.fromkeys(rows["baseline"]) if b != "none"]
    palette = matplotlib.colormaps["tab10"].colors
    colors = {name: palette[(i + 1) % len(palette)] for i, name in enumerate(names)}
    fig, axes = new_figure(len(pairs), panel=(3.4, 2.5), ncols=ncols)
    with matplotlib.rc_context(STYLE):
        for ax, (metric, variant) in zip(axes, pairs, strict=True):
            sub = rows[(rows["metric"] == metric) & (rows["variant"] == variant)]
            _layer_panel(ax, sub, colors)
            ax.set_title(text(pair_title(metric, variant)))
        handles = {}
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        order = ["value", "95% CI", *names]
        handles = {k: handles[k] for k in sorted(handles, key=order.index)}
        fig.legend(
            list(handles.values()),
            [text(x) for x in handles],
            loc="outside lower center",
            ncols=min(len(handles), 6),
        )
    return fig


def _layer_panel(ax: Axes, sub: pd.DataFrame, colors: Mapping[str, object]) -> None:
    obs = sub[sub["baseline"] == "none"].sort_values("layer")
    layers = obs["layer"].to_numpy()
    ok = obs["ci_low"].notna() & obs["ci_high"].notna()
    if ok.any():
        ax.fill_between(
            layers[ok.to_numpy()],
            obs["ci_low"][ok],
            obs["ci_high"][ok],
            color=VALUE_COLOR,
            alpha=0.18,
            linewidth=0,
            label="95% CI",
        )
    for name, base in sub[sub["baseline"] != "none"].groupby("baseline", sort=False):
        base = base.set_index("layer")["value"].reindex(layers)
        ax.plot(layers, base.to_numpy(), "--", color=colors[name], lw=1.1, label=name)
    ax.plot(layers, obs["value"].to_numpy(), "o-", color=VALUE_COLOR, lw=1.8, ms=3.5, label="value")
    ax.axhline(0.0, color="#a0aec0", lw=0.6, zorder=0)
    step = max(1, math.ceil(len(layers) / 12))
    ax.set_xticks(layers[::step], [f"L{int(la)}" for la in layers[::step]])
    ax.set_xlabel("layer")


# ---------------------------------------------------------------------------------------
# Layer x head grids
# ---------------------------------------------------------------------------------------


def heatmap(
    ax: Axes,
    grid: pd.DataFrame,
    *,
    title: str,
    diverging: bool | None = None,
    annotate: bool | None = None,
) -> None:
    """Draw ``grid`` (index: layers, columns: heads) on ``ax``: rows ``L{layer}``,
    columns ``H{head}``, NaN cells grey, a colour bar. Diverging (red positive, blue
    negative, centred at 0) when values of both signs occur; values written in the
    cells when there are at most 64 of them (``annotate`` overrides)."""
    with matplotlib.rc_context(STYLE):
        _heatmap(ax, grid, title=title, diverging=diverging, annotate=annotate)


def _heatmap(ax: Axes, grid: pd.DataFrame, *, title, diverging, annotate) -> None:
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if diverging is None:
        diverging = lo < 0 < hi
    if diverging:
        bound = max(abs(lo), abs(hi), 1e-12)
        cmap, lo, hi = "RdBu_r", -bound, bound
    else:
        cmap = "Blues"
        hi = hi if hi > lo else lo + 1.0
    colormap = matplotlib.colormaps[cmap].with_extremes(bad=NAN_COLOR)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=lo, vmax=hi, aspect="auto")
    n_rows, n_cols = values.shape
    col_step = max(1, math.ceil(n_cols / 16))
    row_step = max(1, math.ceil(n_rows / 16))
    ax.set_xticks(range(0, n_cols, col_step), [f"H{int(h)}" for h in grid.columns[::col_step]])
    ax.set_yticks(range(0, n_rows, row_step), [f"L{int(la)}" for la in grid.index[::row_step]])
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_title(textwrap.fill(text(title), 34))
    ax.figure.colorbar(image, ax=ax, shrink=0.85, pad=0.02)
    if annotate if annotate is not None else values.size <= 64:
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                if not math.isfinite(v):
                    continue
                dark = (
                    abs(v) > 0.6 * max(abs(lo), abs(hi))
                    if diverging
                    else ((v - lo) / (hi - lo) > 0.6)
                )
                ax.text(
                    j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "#1a202c",
                )  # fmt: skip


def panel_size(grid: pd.DataFrame) -> tuple[float, float]:
    """Inches for one heatmap panel of ``grid``: about 0.32 in per cell, within bounds."""
    n_rows, n_cols = grid.shape
    return min(6.0, max(2.6, 0.32 * n_cols + 1.4)), min(6.0, max(1.9, 0.26 * n_rows + 1.0))


# ---------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------


def plot_accuracy(
    accuracy: Mapping[str, float], control: Mapping[str, float] | None = None
) -> Figure:
    """Validation accuracy of each setting as horizontal bars labelled with their
    values; with ``control`` (the untrained-weights control), a lighter bar beside each.

    >>> fig = plot_accuracy({"zsl": 0.5, "icl": 0.9, "ft": 0.7})
    >>> [round(float(p.get_width()), 2) for p in fig.axes[0].patches]
    [0.5, 0.9, 0.7]
    """
    names = list(accuracy)
    y = np.arange(len(names))
    height = 0.38 if control else 0.6
    fig, (ax,) = new_figure(1, panel=(3.4, 0.3 * len(names) * (2 if control else 1) + 0.7))
    with matplotlib.rc_context(STYLE):
        palette = matplotlib.colormaps["tab10"].colors
        values = [_finite(accuracy[k]) for k in names]
        offset = -height / 2 if control else 0.0
        bars = ax.barh(
            y + offset, values, height, color=[palette[i % 10] for i in range(len(names))]
        )
        _label_bars(ax, bars, values)
        if control:
            c_values = [_finite(control.get(k)) for k in names]
            c_bars = ax.barh(
                y + height / 2, c_values, height, color="#cbd5e0", label="untrained weights"
            )
            _label_bars(ax, c_bars, c_values)
            ax.legend(loc="lower right")
        ax.set_yticks(y, [text(SETTING_NAMES.get(k, k)) for k in names])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("validation accuracy")
    return fig


def _finite(x: object) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def _label_bars(ax: Axes, bars, values: Sequence[float]) -> None:
    """Each bar's value at its end; ``n/a`` where there is no value (and no bar)."""
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=2, fontsize=7)
    for bar, v in zip(bars, values, strict=True):
        if math.isnan(v):
            y = bar.get_y() + bar.get_height() / 2
            ax.text(0.01, y, "n/a", va="center", fontsize=7, color="#718096")
