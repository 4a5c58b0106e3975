"""One self-contained, offline HTML page for a comparison run: ``icl-lens report DIR``.

The page is the Jinja2 template ``templates/report.html.j2`` (autoescaping on) filled
with the run (:mod:`icl_lens.views.run_data`) and its matplotlib figures (inline SVG):

- the run's settings and the accuracies (ZSL, ICL, FT, and the untrained-weights
  control when present);
- the metric table: every metric and variant with its bootstrap interval, query
  counts, each baseline and any further column of the metrics frame (all generic: a new
  baseline or column shows up without a template change);
- per-layer plots of every metric with its interval and baselines
  (:func:`~icl_lens.views.figures.plot_layers`), one figure per FT mode side by side
  when the run has several (``ft_mode`` column: the paper's FT, Deutch et al.'s
  layer-causal FT);
- what the run cannot say (its flags: a learning rate at the edge of its grid, ...);
- layer x head heatmaps (:mod:`icl_lens.views.heatmaps`) and the circuitsvis panels of
  the top heads by ``|dW_ICL q|`` with the query's attention under ZSL / ICL / FT;
- when the run has ``interventions.json`` (``icl-lens run --interventions``), the
  causal tests of the dual form: necessity and sufficiency per head and the top-k
  curves (:mod:`icl_lens.views.interventions`), the whole-model and all-heads tables
  with intervals and flags, and the top head's transplanted update token by token
  (``transplant_view.json``).

Everything is inlined (circuitsvis's JavaScript once, SVG figures, CSS): the page opens
with networking off.

>>> write_report("runs/toy")                       # -> runs/toy/report.html  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from icl_lens.analyses import FRAME_COLUMNS
from icl_lens.files import atomic_write_text
from icl_lens.study.comparison import PAPER_VARIANT
from icl_lens.views.figures import (
    METRIC_TITLES,
    metric_pairs,
    plot_accuracy,
    plot_layers,
    svg,
)
from icl_lens.views.heatmaps import metric_grids, plot_decomposition_heads, plot_metric_heads
from icl_lens.views.interventions import plot_curve, plot_heads
from icl_lens.views.page import SETTING_NAMES, View, fmt, render, render_views
from icl_lens.views.run_data import (
    RunData,
    ViewData,
    collect_views,
    load_run,
    normalise_frame,
    save_views,
)

# what a report needs, from one import: the view data and reading a run (run_data)
__all__ = [
    "RunData",
    "ViewData",
    "collect_views",
    "by_ft_mode",
    "load_run",
    "metrics_table",
    "render_report",
    "save_views",
    "write_report",
]

REPORT_FILE = "report.html"
RUN_KEYS = (
    "task_name",
    "shots",
    "seed",
    "order_seed",
    "balanced",
    "protocol",
    "ft_mode",
    "lr_selection",
    "n_draws",
    "n_queries",
)
INFO_KEYS = ("k_effective", "demonstration_tokens", "model_line")
LAST_COLUMNS = ("flag",)
"""Extra frame columns shown after the baselines (text that would push them aside)."""
STAT_HEADERS = {
    "value": "value",
    "ci": "95% CI",
    "n_queries": "queries",
    "n_skipped": "skipped",
}


def _as_run(source: Any, views: ViewData | None) -> RunData:
    if isinstance(source, RunData):
        run = source
    elif isinstance(source, (str, os.PathLike)):
        run = load_run(source)
    elif hasattr(source, "to_dict") and hasattr(source, "metrics"):  # a Comparison
        run = RunData(results=source.to_dict(), metrics=normalise_frame(source.metrics()))
    else:
        raise TypeError(
            "write_report needs a run directory, a Comparison or RunData; "
            f"got {type(source).__name__}"
        )
    if views is not None:
        run.views = views
    return run


# ---------------------------------------------------------------------------------------
# Sections as data for the template
# ---------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return fmt(value)


def _count(x: Any) -> str:
    v = pd.to_numeric(x, errors="coerce")
    return "n/a" if pd.isna(v) else str(int(v))


def metrics_table(frame: pd.DataFrame) -> dict[str, Any]:
    """The overall rows (layer and head -1) of a tidy metrics frame as a table:
    ``{"columns": [...], "baselines": [...], "rows": [{"cells": [...], "paper": bool}]}``,
    cells formatted as text.

    One row per observed overall row (``baseline == "none"``), the paper's metrics and
    variants first. Columns: metric, variant, value, 95% CI, queries, skipped, then every
    column of the frame beyond the tidy format (flags, an FT mode, ...), then one column
    per baseline, then the ``flag`` column (a sentence: last, so the numbers stay in
    view). A baseline cell comes from the rows of the same metric and variant that agree
    with the row on each extra column telling the observed rows apart.

    >>> frame = pd.DataFrame({"metric": ["simaou"] * 2, "variant": ["normalised"] * 2,
    ...     "baseline": ["none", "icl_retest"], "layer": [-1, -1], "head": [-1, -1],
    ...     "value": [0.25, 0.5], "flag": ["uninformative", None]})
    >>> t = metrics_table(frame)
    >>> t["columns"][-2:], t["rows"][0]["cells"][:3], t["rows"][0]["cells"][-2:]
    (['icl_retest', 'flag'], ['SimAOU', 'normalised (paper)', '0.250'], ['0.500', 'uninformative'])
    """
    frame = normalise_frame(frame)
    overall = frame[(frame["layer"] < 0) & (frame["head"] < 0)]
    extra = [c for c in overall.columns if c not in FRAME_COLUMNS and c != "head_label"]
    last = [c for c in extra if c in LAST_COLUMNS]  # long texts after the numbers
    extra = [c for c in extra if c not in LAST_COLUMNS]
    observed = overall[overall["baseline"] == "none"]
    baselines = [b for b in dict.fromkeys(overall["baseline"]) if b != "none"]
    rows = []
    for metric, variant in metric_pairs(observed):
        same = overall[(overall["metric"] == metric) & (overall["variant"] == variant)]
        obs = same[same["baseline"] == "none"]
        keys = [c for c in extra if obs[c].nunique(dropna=True) > 1]
        paper = PAPER_VARIANT.get(metric) == variant
        for _, o in obs.iterrows():
            match = same[same["baseline"] != "none"]
            for key in keys:
                match = match[match[key].isna() | (match[key] == o[key])]
            by_base = dict(zip(match["baseline"], match["value"], strict=True))
            cells = [
                METRIC_TITLES.get(metric, metric),
                f"{variant} (paper)" if paper else variant,
                fmt(o["value"]),
                f"[{fmt(o['ci_low'])}, {fmt(o['ci_high'])}]",
                _count(o["n_queries"]),
                _count(o["n_skipped"]),
                *(_cell(o[c]) for c in extra),
                *(fmt(by_base.get(b)) for b in baselines),
                *(_cell(o[c]) for c in last),
            ]
            rows.append({"cells": cells, "paper": paper})
    columns = ["metric", "variant", *STAT_HEADERS.values(), *extra, *baselines, *last]
    return {"columns": columns, "baselines": baselines, "rows": rows}


def _run_rows(results: Mapping[str, Any]) -> list[tuple[str, Any]]:
    config = results.get("config") or {}
    info = results.get("info") or {}
    rows = [(k, config[k]) for k in RUN_KEYS if k in config]
    rows += [(k, info[k]) for k in INFO_KEYS if k in info]
    modes = results.get("ft_modes") or {}
    if isinstance(modes, Mapping) and len(modes) > 1:
        for mode, entry in modes.items():
            if isinstance(entry, Mapping) and entry.get("lr") is not None:
                rows.append((f"FT learning rate ({mode})", entry["lr"]))
        return rows
    lr = results.get("lr")
    if isinstance(lr, Mapping) and lr.get("selected") is not None:
        rows.append(("FT learning rate", lr["selected"]))
    return rows


def by_ft_mode(frame: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """``[(mode, rows)]`` per FT mode of a metrics frame, in order of appearance;
    ``[(None, frame)]`` when it has one mode (or no ``ft_mode`` column).

    >>> frame = pd.DataFrame({"ft_mode": ["standard", "layer_causal", "standard"]})
    >>> [(m, len(f)) for m, f in by_ft_mode(frame)]
    [('standard', 2), ('layer_causal', 1)]
    """
    if "ft_mode" not in frame or frame["ft_mode"].nunique(dropna=True) < 2:
        return [(None, frame)]
    return [
        (str(m), frame[frame["ft_mode"] == m]) for m in dict.fromkeys(frame["ft_mode"].dropna())
    ]


def _layer_figures(metrics: pd.DataFrame) -> list[tuple[str | None, Any]]:
    per_layer = metrics[(metrics["layer"] >= 0) & (metrics["head"] < 0)]
    return [(mode, svg(plot_layers(rows))) for mode, rows in by_ft_mode(per_layer) if len(rows)]


def _accuracy(results: Mapping[str, Any]) -> dict[str, Any]:
    acc = results.get("accuracy") or {}
    control = results.get("control") or {}
    c_acc = control.get("accuracy") if isinstance(control, Mapping) else None
    return {
        "names": [SETTING_NAMES.get(k, str(k)) for k in acc],
        "scores": [fmt(v) for v in acc.values()],
        "control": [fmt(c_acc.get(k)) for k in acc] if c_acc else None,
        "figure": svg(plot_accuracy(acc, c_acc or None)) if acc else None,
    }


def _overview(run: RunData) -> list[Any]:
    figures = []
    heads = run.views.heads if run.views is not None else None
    if heads is not None and len(heads):
        figures.append(svg(plot_decomposition_heads(heads)))
    for _, rows in by_ft_mode(run.metrics):  # per mode: a grid holds one value per cell
        if metric_grids(rows):
            figures.append(svg(plot_metric_heads(rows)))
    return figures


# ---------------------------------------------------------------------------------------
# The interventions
# ---------------------------------------------------------------------------------------

HEAD_COLUMNS = (
    ("knockout", "", "removed", "removed by Knockout({h})"),
    ("restore", "", "recovered", "recovered by Restore({h})"),
    ("transplant", "linear", "recovered", "Transplant({h}, linear)"),
    ("transplant", "fitted", "recovered", "Transplant({h}, fitted)"),
)
INFO_ROWS = (
    ("task", "task"),
    ("k_effective", "demonstrations"),
    ("n_queries", "measured queries"),
    ("blind_vs_zsl", "max |Blind - ZSL| logits"),
    ("icl_vs_blind", "max |ICL - Blind| logits"),
    ("path", "path"),
)


def _info(value: Any) -> str:
    return str(value) if isinstance(value, (str, int)) else fmt(value)


def _with_ci(row: Any) -> str:
    if row is None:
        return ""
    ci = f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]" if pd.notna(row["ci_low"]) else ""
    return fmt(row["value"]) + ci


def _flags(rows: pd.DataFrame) -> str:
    return "; ".join(dict.fromkeys(str(f) for f in rows["flag"] if isinstance(f, str)))


def _model_table(frame: pd.DataFrame) -> dict[str, Any]:
    """Whole-model rows, one per condition and control: each metric's mean and the share
    of ICL's effect it recovers or removes, with their intervals."""
    model = frame[frame["scope"] == "model"]
    rows = []
    for (intervention, form, control), group in model.groupby(
        ["intervention", "form", "control"], sort=False, dropna=False
    ):
        cells = [f"{intervention} ({form})" if form else intervention, control]
        for metric in ("margin", "accuracy"):
            rows_of = group[group["metric"] == metric]
            value = rows_of[rows_of["quantity"] == "value"]
            share = rows_of[rows_of["quantity"] != "value"]
            cells.append(_with_ci(value.iloc[0] if len(value) else None))
            name = f"{share['quantity'].iloc[0]} " if len(share) else ""
            cells.append(name + _with_ci(share.iloc[0]) if len(share) else "")
        cells.append(_flags(group))
        rows.append(cells)
    columns = ["condition", "control", "margin", "share of the margin", "accuracy",
               "share of the accuracy", "flag"]  # fmt: skip
    return {"columns": columns, "rows": rows}


def _heads_table(result: Any, metric: str = "margin") -> dict[str, Any]:
    """Every head: removed by its knockout, recovered by its restore and transplants
    (intervals), its fitted c_h, its flags."""
    frame = result.frame
    heads = frame[(frame["scope"] == "head") & (frame["control"] == "none")]
    heads = heads[heads["metric"] == metric]
    rows = []
    for (layer, head), group in heads.groupby(["layer", "head"]):
        cells = [f"L{layer}H{head}"]
        for intervention, form, quantity, _ in HEAD_COLUMNS:
            match = group[
                (group["intervention"] == intervention)
                & (group["form"].fillna("") == form)
                & (group["quantity"] == quantity)
            ]
            cells.append(_with_ci(match.iloc[0] if len(match) else None))
        cells.append(fmt(float(result.scales[layer, head])))
        cells.append(_flags(group[group["quantity"] != "value"]))
        rows.append(cells)
    columns = ["head", *(c[3] for c in HEAD_COLUMNS), "fitted c_h", "flag"]
    return {"columns": columns, "rows": rows, "metric": metric}


def _interventions(run: RunData) -> dict[str, Any] | None:
    result = run.interventions
    if result is None:
        return None
    frame, info = result.frame, result.info
    figures = []
    for plot in (plot_heads, plot_curve):
        try:
            figures.append(svg(plot(result)))
        except ValueError:  # a run without per-head rows or curves: no figure of them
            continue
    rows = [(name, _info(info[key])) for key, name in INFO_ROWS if key in info]
    rows.append(("task vector layer", result.task_vector_layer))
    rows.append(("most necessary heads (fit queries)", ", ".join(
        f"L{la}H{h}" for la, h in result.ranking[:5])))  # fmt: skip
    return {
        "rows": rows,
        "figures": figures,
        "model_table": _model_table(frame),
        "heads_table": _heads_table(result),
        "flags": [str(f) for f in result.flags],
        "transplant": run.transplant,
    }


def _package_version() -> str:
    try:
        return version("icl-lens")
    except PackageNotFoundError:
        return "unknown"


def render_report(source: Any, *, views: ViewData | None = None, title: str | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    run = _as_run(source, views)
    results = run.results
    task = (results.get("config") or {}).get("task_name") or (results.get("info") or {}).get("task")
    title = title or (f"icl-lens report: {task}" if task else "icl-lens report")
    panels = run.views
    has_panels = panels is not None and bool(panels.meta_gradients or panels.attention)
    views = {"panels": panels.view()} if has_panels else {}
    if run.transplant is not None:
        views["transplant"] = View(run.transplant.view())
    # fixed element ids: the same run gives the same page; one script mounts them all
    bodies, script = render_views(views, prefix="icl-lens-report")
    return str(
        render(
            "report.html.j2",
            title=title,
            source=run.source,
            run_rows=_run_rows(results),
            accuracy=_accuracy(results),
            table=metrics_table(run.metrics),
            layers_figures=_layer_figures(run.metrics),
            flags=[str(f) for f in results.get("flags") or []],
            overview=_overview(run),
            panels=panels if has_panels else None,
            panels_body=bodies.get("panels"),
            interventions=_interventions(run),
            transplant_body=bodies.get("transplant"),
            script=script,
            version=_package_version(),
        )
    )


def write_report(
    source: Any,
    path: str | os.PathLike | None = None,
    *,
    views: ViewData | None = None,
    title: str | None = None,
) -> Path:
    """Write the report of a run to ``path`` (default ``DIR/report.html`` for a run
    directory), atomically; returns the path.

    ``source``: a run directory (``results.json``, ``metrics.csv``, optional
    ``views.json``), a :class:`~icl_lens.study.comparison.Comparison` or :class:`RunData`.
    ``views`` (:func:`~icl_lens.views.run_data.collect_views`) adds or replaces the
    circuitsvis panels.

    >>> import json, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> results = {"accuracy": {"zsl": .6, "icl": .9, "ft": .7},
    ...            "metrics": {"simaou": {"value": .2, "baselines": {"random_uniform": 0.}}}}
    >>> _ = (d / "results.json").write_text(json.dumps(results))
    >>> write_report(d).name
    'report.html'
    """
    if path is None:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError("give a path for the report of a Comparison (e.g. 'report.html')")
        path = Path(source) / REPORT_FILE
    page = render_report(source, views=views, title=title)
    return atomic_write_text(path, page)
