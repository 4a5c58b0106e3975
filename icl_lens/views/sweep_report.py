"""The page of a sweep directory (``icl-lens report DIR`` where DIR holds ``sweep.json``):
the paper's table and per-layer curves across cells, one self-contained offline file.

Rows of the table: every combination of the grid keys other than the seeds (task x model
x ...); columns: ZSL / ICL / FT accuracy, Rec2FTP, SimAOU, SimAM, Kendall (the paper's
variants), each the mean over seeds with its spread (std, n) and interval, and under it
the controls that could refute it: the shuffled-queries (Rec2FTP: independent) baseline
and the same architecture with untrained weights. Per-layer curves: the mean over seeds
of SimAOU, SimAM and Kendall per layer, shaded by the std, the untrained control dashed.

It reads only the tables (``aggregate.parquet``, ``sweep.json``, ``failures.json``);
every string from them is escaped by the template (Jinja2 autoescape), and the curves
are inline SVG (matplotlib).

>>> write_sweep_report("runs/study")          # -> runs/study/report.html  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from icl_lens.files import atomic_write_text

__all__ = ["COLUMNS", "CURVES", "paper_table", "render_sweep_report", "write_sweep_report"]

COLUMNS = [  # (title, metric, variant, control baseline)
    ("ZSL acc.", "accuracy", "zsl", None),
    ("ICL acc.", "accuracy", "icl", None),
    ("FT acc.", "accuracy", "ft", None),
    ("Rec2FTP", "rec2ftp", "paper", "independent"),
    ("SimAOU", "simaou", "normalised", "shuffled_queries"),
    ("SimAM", "simam", "after", "shuffled_queries"),
    ("Kendall", "kendall", "tau_b", "shuffled_queries"),
]
CURVES = [
    ("SimAOU", "simaou", "normalised"),
    ("SimAM", "simam", "after"),
    ("Kendall", "kendall", "tau_b"),
]
UNTRAINED = "untrained_weights"
SEEDS = ("seed", "order_seed")

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th.key, td.key { text-align: left; }
.spread { color: #555; } .ctl { color: #777; font-size: 85%; } .fail { color: #a00; }
figure { display: inline-block; margin: 0 1em 1em 0; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ n_cells }} cells ({{ n_done }} done{% if failures %}, <span class="fail">{{ failures|length }}
failed</span>{% endif %}); the mean over {{ seed_text }} per row, &plusmn; its std (n cells),
the interval in brackets, and under it the controls (shuffled queries / independent, and
untrained weights).</p>
<table>
<tr>{% for key in keys %}<th class="key">{{ key }}</th>{% endfor %}
{% for title in column_titles %}<th>{{ title }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>
{% for value in row.labels %}<td class="key">{{ value }}</td>{% endfor %}
{% for cell in row.cells %}<td>{{ cell.value }}<span class="spread">{{ cell.spread }}</span>
{% if cell.interval %}<br><span class="spread">{{ cell.interval }}</span>{% endif %}
{% if cell.controls %}<br><span class="ctl">{{ cell.controls }}</span>{% endif %}</td>{% endfor %}
</tr>{% endfor %}
</table>
{% if interval_note %}<p class="ctl">{{ interval_note }}</p>{% endif %}
<h2>Per layer, across cells</h2>
{% for fig in figures %}<figure>{{ fig }}</figure>{% endfor %}
{% if failures %}<h2 class="fail">Failed cells</h2><table>
<tr><th class="key">cell</th><th class="key">error</th><th class="key">log</th></tr>
{% for f in failures %}<tr><td class="key">{{ f.name }}</td><td class="key">{{ f.error }}</td>
<td class="key">{{ f.log or "" }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Grid</h2><pre>{{ grid_text }}</pre>
</body></html>
"""


def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _keys(grid: dict[str, Any]) -> list[str]:
    return [k for k in grid.get("grid", {}) if k not in SEEDS]


def paper_table(aggregate: pd.DataFrame, keys: list[str]) -> list[dict[str, Any]]:
    """One dict per row combination: ``labels`` (its values of ``keys``) and ``cells``
    (per column: value, spread, interval, controls), in the order of :data:`COLUMNS`."""
    overall = aggregate[(aggregate["layer"] == -1) & (aggregate["head"] == -1)]
    groups = overall.groupby(keys, sort=False, dropna=False) if keys else [((), overall)]
    rows = []
    for values, part in groups:
        values = values if isinstance(values, tuple) else (values,)
        index = part.set_index(["metric", "variant", "baseline"])
        cells = []
        for _, metric, variant, control in COLUMNS:
            row = (
                index.loc[(metric, variant, "none")]
                if (metric, variant, "none") in index.index
                else None
            )
            cell = {"value": "–", "spread": "", "interval": "", "controls": ""}
            if row is not None:
                cell["value"] = _fmt(row["mean"])
                cell["spread"] = f" ± {_fmt(row['std'])} (n={int(row['n'])})"
                if not math.isnan(row["ci_low"]):
                    cell["interval"] = f"[{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"
            shown = []
            for name, label in (
                (control, control and control.replace("_", " ")),
                (UNTRAINED, "untrained"),
            ):
                if name and (metric, variant, name) in index.index:
                    shown.append(f"{label} {_fmt(index.loc[(metric, variant, name)]['mean'])}")
            cell["controls"] = " · ".join(shown)
            cells.append(cell)
        rows.append({"labels": [str(v) for v in values], "cells": cells})
    return rows


def _curve_svg(aggregate: pd.DataFrame, keys: list[str], title: str, metric: str, variant: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = aggregate[
        (aggregate["metric"] == metric)
        & (aggregate["variant"] == variant)
        & (aggregate["layer"] >= 0)
        & (aggregate["head"] == -1)
    ]
    if layers.empty:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    groups = layers.groupby(keys, sort=False, dropna=False) if keys else [((), layers)]
    for i, (values, part) in enumerate(groups):
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all"
        color = f"C{i % 10}"
        obs = part[part["baseline"] == "none"].sort_values("layer")
        ax.plot(obs["layer"], obs["mean"], color=color, marker="o", ms=3, label=label)
        std = obs["std"].fillna(0.0)
        ax.fill_between(obs["layer"], obs["mean"] - std, obs["mean"] + std, color=color, alpha=0.2)
        ctl = part[part["baseline"] == UNTRAINED].sort_values("layer")
        if len(ctl):
            ax.plot(ctl["layer"], ctl["mean"], color=color, ls="--", lw=1)
    ax.set_title(f"{title} per layer (dashed: untrained weights)", fontsize=9)
    ax.set_xlabel("layer")
    ax.legend(fontsize=7)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return Markup(svg[svg.index("<svg") :])  # matplotlib's own markup, no user text unescaped


def render_sweep_report(directory: str | os.PathLike, *, title: str | None = None) -> str:
    """The HTML of a sweep directory's page (needs ``aggregate.parquet``)."""
    root = Path(directory)
    path = root / "aggregate.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `icl-lens sweep` on {root} first")
    grid = json.loads((root / "sweep.json").read_text())
    aggregate = pd.read_parquet(path)
    failures_path = root / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else []
    keys = _keys(grid)
    seeds = [k for k in grid.get("grid", {}) if k in SEEDS]
    figures = [_curve_svg(aggregate, keys, t, m, v) for t, m, v in CURVES]
    n_cells = len(grid.get("cells", []))
    no_interval = aggregate["ci_low"].isna().all() if len(aggregate) else True
    env = jinja2.Environment(autoescape=True)
    return env.from_string(TEMPLATE).render(
        title=title or f"icl-lens sweep: {root.name}",
        n_cells=n_cells,
        n_done=n_cells - len(failures),
        failures=failures,
        seed_text=" and ".join(seeds) if seeds else "cells (no seed axis)",
        keys=keys,
        column_titles=[c[0] for c in COLUMNS],
        rows=paper_table(aggregate, keys),
        interval_note="Intervals: not computed yet (the hierarchical bootstrap over "
        "demonstration sets, then queries, is pending)."
        if no_interval
        else "",
        figures=[f for f in figures if f is not None],
        grid_text=json.dumps({k: grid.get(k) for k in ("run", "grid")}, indent=2),
    )


def write_sweep_report(
    directory: str | os.PathLike, out: str | os.PathLike | None = None, *, title: str | None = None
) -> Path:
    """Write the sweep page to ``out`` (default ``DIR/report.html``)."""
    path = Path(out) if out is not None else Path(directory) / "report.html"
    return atomic_write_text(path, render_sweep_report(directory, title=title))
