"""The page of a sweep directory (``icl-lens report DIR`` where DIR holds ``sweep.json``):
the paper's table and per-layer curves across cells, one self-contained offline file.

Rows of the table: every combination of the grid keys other than the seeds (task x model
x ...); columns: ZSL / ICL / FT accuracy, Rec2FTP, SimAOU, SimAM, Kendall (the paper's
variants), each the mean over seeds with its spread (std, n) and interval, and under it
the controls that could refute it: the shuffled-queries (Rec2FTP: independent) baseline
and the same architecture with untrained weights. Per-layer curves: the mean over seeds
of SimAOU, SimAM and Kendall per layer, one line per row, the std as a band, the
untrained control dashed.

It reads only the sweep's files (``aggregate.parquet``, ``sweep.json``,
``failures.json``) and renders ``sweep_report.html.j2`` (autoescaped) with matplotlib
figures inlined as SVG (:mod:`icl_lens.views.figures`). Its counts come from the cells
the aggregate was built from (recorded in the table's metadata): ``icl-lens report``
rebuilds a table that no longer matches the cells on disk before it renders the page.

>>> write_sweep_report("runs/study")          # -> runs/study/report.html  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from icl_lens.files import atomic_write_text
from icl_lens.views.figures import METRIC_TITLES, STYLE, new_figure, svg, text
from icl_lens.views.page import fmt, render
from icl_lens.views.report import _package_version

__all__ = [
    "TABLE_CELLS_KEY",
    "COLUMNS",
    "CURVES",
    "by_ft_mode",
    "paper_table",
    "plot_layers_across",
    "read_sweep",
    "render_sweep_report",
    "table_cells",
    "write_sweep_report",
]

TABLE_CELLS_KEY = b"icl_lens_cells"
"""Parquet metadata of a sweep table: the grid keys and the cells it was built from."""

COLUMNS = [  # (title, metric, variant, control baseline)
    ("ZSL acc.", "accuracy", "zsl", None),
    ("ICL acc.", "accuracy", "icl", None),
    ("FT acc.", "accuracy", "ft", None),
    ("Rec2FTP", "rec2ftp", "paper", "independent"),
    ("SimAOU", "simaou", "normalised", "shuffled_queries"),
    ("SimAM", "simam", "after", "shuffled_queries"),
    ("Kendall", "kendall", "tau_b", "shuffled_queries"),
]
CURVES = [("simaou", "normalised"), ("simam", "after"), ("kendall", "tau_b")]
UNTRAINED = "untrained_weights"
SEEDS = ("seed", "order_seed")


def _groups(frame: pd.DataFrame, keys: list[str]):
    """``(values tuple, rows)`` per combination of ``keys`` (one group without keys)."""
    if not keys:
        return [((), frame)]
    return [
        (v if isinstance(v, tuple) else (v,), part)
        for v, part in frame.groupby(keys, sort=False, dropna=False)
    ]


def by_ft_mode(aggregate: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """With several FT modes (``--ft-mode both``): each mode its own row (``ft_mode`` a
    key), the accuracy rows (no mode) repeated for each, ``ft_<mode>`` read as its FT
    accuracy. As they are otherwise.

    >>> agg = pd.DataFrame({"metric": ["accuracy", "accuracy", "simaou", "simaou"],
    ...     "variant": ["ft", "ft_layer_causal", "normalised", "normalised"],
    ...     "ft_mode": [None, None, "standard", "layer_causal"]})
    >>> frame, keys = by_ft_mode(agg, [])
    >>> keys, frame.query("metric == 'accuracy'")[["variant", "ft_mode"]].values.tolist()
    (['ft_mode'], [['ft', 'standard'], ['ft', 'layer_causal']])
    """
    if "ft_mode" not in aggregate or aggregate["ft_mode"].nunique(dropna=True) < 2:
        return aggregate, keys
    modes = list(dict.fromkeys(aggregate["ft_mode"].dropna()))
    accuracy = aggregate[aggregate["ft_mode"].isna()]
    settings = set(accuracy["variant"])
    parts = [aggregate[aggregate["ft_mode"].notna()]]
    for mode in modes:
        ft = f"ft_{mode}" if f"ft_{mode}" in settings else "ft"  # the first mode's is "ft"
        acc = accuracy[~accuracy["variant"].str.startswith("ft") | (accuracy["variant"] == ft)]
        parts.append(acc.assign(ft_mode=mode, variant=acc["variant"].replace({ft: "ft"})))
    return pd.concat(parts, ignore_index=True), [*keys, "ft_mode"]


def paper_table(aggregate: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    """One dict per row combination: ``labels`` (its values of ``keys``) and ``cells``
    (per column: value, spread, interval, controls), in the order of :data:`COLUMNS`."""
    overall = aggregate[(aggregate["layer"] == -1) & (aggregate["head"] == -1)]
    rows = []
    for values, part in _groups(overall, keys):
        index = part.set_index(["metric", "variant", "baseline"])
        cells = []
        for _, metric, variant, control in COLUMNS:
            cell = {"value": "n/a", "spread": "", "interval": "", "controls": ""}
            if (metric, variant, "none") in index.index:
                row = index.loc[(metric, variant, "none")]
                cell["value"] = fmt(row["mean"])
                cell["spread"] = f" ± {fmt(row['std'])} (n={int(row['n'])})"
                if not math.isnan(row["ci_low"]):
                    cell["interval"] = f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
            shown = []
            for name in (control, UNTRAINED):
                if name and (metric, variant, name) in index.index:
                    label = "untrained" if name == UNTRAINED else name.replace("_", " ")
                    shown.append(f"{label} {fmt(index.loc[(metric, variant, name)]['mean'])}")
            cell["controls"] = " · ".join(shown)
            cells.append(cell)
        rows.append({"labels": [str(v) for v in values], "cells": cells})
    return rows


def plot_layers_across(aggregate: pd.DataFrame, keys: list[str]) -> Figure | None:
    """SimAOU, SimAM and Kendall per layer: one line per row of the table (its mean over
    seeds, the std as a band), its untrained-weights control dashed in the same colour.
    None when the aggregate has no per-layer rows.

    >>> agg = pd.DataFrame({"model": ["a", "a"], "metric": "simaou", "variant": "normalised",
    ...     "baseline": "none", "layer": [0, 1], "head": -1, "mean": [0.1, 0.3],
    ...     "std": [0.01, 0.02]})
    >>> [ax.get_title() for ax in plot_layers_across(agg, ["model"]).axes]
    ['SimAOU (normalised)']
    """
    layers = aggregate[(aggregate["layer"] >= 0) & (aggregate["head"] == -1)]
    curves = [
        (m, v) for m, v in CURVES if ((layers["metric"] == m) & (layers["variant"] == v)).any()
    ]
    if not curves:
        return None
    fig, axes = new_figure(len(curves), panel=(3.6, 2.7))
    palette = matplotlib.colormaps["tab10"].colors
    with matplotlib.rc_context(STYLE):
        for ax, (metric, variant) in zip(axes, curves, strict=True):
            sub = layers[(layers["metric"] == metric) & (layers["variant"] == variant)]
            for i, (values, part) in enumerate(_groups(sub, keys)):
                color = palette[i % len(palette)]
                label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
                obs = part[part["baseline"] == "none"].sort_values("layer")
                std = obs["std"].fillna(0.0)
                ax.fill_between(
                    obs["layer"],
                    obs["mean"] - std,
                    obs["mean"] + std,
                    color=color,
                    alpha=0.15,
                    lw=0,
                )
                ax.plot(
                    obs["layer"], obs["mean"], "o-", color=color, ms=3, label=text(label or "all")
                )
                ctl = part[part["baseline"] == UNTRAINED].sort_values("layer")
                if len(ctl):
                    ax.plot(ctl["layer"], ctl["mean"], "--", color=color, lw=1)
            ax.axhline(0.0, color="#a0aec0", lw=0.6, zorder=0)
            ax.set_title(text(f"{METRIC_TITLES.get(metric, metric)} ({variant})"))
            ax.set_xlabel("layer")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {fix}") from err
    except OSError as err:
        raise ValueError(f"cannot read {path} ({err.strerror or err}): {fix}") from err


def read_sweep(directory: str | os.PathLike) -> dict[str, Any]:
    """``DIR/sweep.json``; a damaged one is refused naming the file and the fix."""
    path = Path(directory) / "sweep.json"
    fix = "run `icl-lens sweep` with the grid file again to rewrite it"
    data = _read_json(path, "sweep", fix)
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list) or not all(
        isinstance(c, dict) and {"settings", "grid"} <= set(c) for c in cells
    ):
        raise ValueError(f"{path} has no list of cells with settings and grid: {fix}")
    return data


def table_cells(path: str | os.PathLike) -> dict[str, Any] | None:
    """The grid keys and cells a sweep table was built from (its Parquet metadata);
    None for a missing, unreadable or foreign table."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[TABLE_CELLS_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None


AGGREGATE_COLUMNS = ["metric", "variant", "baseline", "layer", "head", "mean", "std", "n"]


def render_sweep_report(directory: str | os.PathLike, *, title: str | None = None) -> str:
    """The HTML of a sweep directory's page (needs ``aggregate.parquet``)."""
    root = Path(directory)
    path = root / "aggregate.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `icl-lens sweep` on {root} first")
    grid = read_sweep(root)
    built = table_cells(path)
    try:
        aggregate = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable Parquet table ({err})") from err
    missing = [c for c in [*AGGREGATE_COLUMNS, "ci_low", "ci_high"] if c not in aggregate]
    if missing or built is None:
        what = f"lacks the columns {missing}" if missing else "does not say which cells it holds"
        raise ValueError(
            f"{path} {what}: not a table of this sweep; `icl-lens report {root}` rebuilds it "
            "from the cells"
        )
    done = {cell_id for cell_id, *_ in built["cells"]}
    failures_path = root / "failures.json"
    failures = []
    if failures_path.exists():
        failures = _read_json(failures_path, "failures", "delete it; the next sweep rewrites it")
        ids = {c.get("id") for c in grid["cells"]}
        failures = [
            f
            for f in (failures if isinstance(failures, list) else [])
            if isinstance(f, dict)
            and f.get("cell", f.get("name")) not in done
            and (f.get("cell") is None or f.get("cell") in ids)
        ]
    keys = [k for k in grid.get("grid", {}) if k not in SEEDS]
    seeds = [k for k in grid.get("grid", {}) if k in SEEDS]
    aggregate, keys = by_ft_mode(aggregate, keys)
    figure = plot_layers_across(aggregate, keys)
    n_cells = len({c.get("id", i) for i, c in enumerate(grid["cells"])})
    pending = not len(aggregate) or bool(aggregate["ci_low"].isna().all())
    grid_rows = [(f"run.{k}", json.dumps(v)) for k, v in grid.get("run", {}).items()]
    grid_rows += [(f"grid.{k}", json.dumps(v)) for k, v in grid.get("grid", {}).items()]
    return str(
        render(
            "sweep_report.html.j2",
            title=title or f"icl-lens sweep: {root.resolve().name}",
            source=str(root),
            n_cells=n_cells,
            n_done=len(done),
            n_unfinished=n_cells - len(done) - len(failures),
            failures=failures,
            seed_text=" and ".join(seeds) if seeds else "cells (the grid has no seed axis)",
            keys=keys,
            column_titles=[c[0] for c in COLUMNS],
            rows=paper_table(aggregate, keys),
            interval_note="Intervals: none (the cells hold no values.npz: runs from before "
            "icl-lens wrote it)."
            if pending
            else "Intervals: a t interval over demonstration sets (each the mean over its "
            "orders and the control's draws) plus the shared queries' part (a bootstrap), "
            "cut to the metric's range; with one set they cover the queries only.",
            figure=svg(figure) if figure is not None else None,
            grid_rows=grid_rows,
            version=_package_version(),
        )
    )


def write_sweep_report(
    directory: str | os.PathLike, out: str | os.PathLike | None = None, *, title: str | None = None
) -> Path:
    """Write the sweep page to ``out`` (default ``DIR/report.html``), atomically."""
    path = Path(out) if out is not None else Path(directory) / "report.html"
    return atomic_write_text(path, render_sweep_report(directory, title=title))
