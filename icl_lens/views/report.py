"""One self-contained, offline HTML page for a comparison run: ``icl-lens report DIR``.

A run directory holds ``results.json`` and ``metrics.csv`` (written by ``icl-lens run``
or :meth:`Comparison.to_json` / ``to_csv``) and, optionally, ``views.json``: the
per-token data of the circuitsvis panels, written by :func:`save_views` from the model,
the ICL prompt and the finetuned model (or its learning rate). The page shows:

- the accuracies (ZSL, ICL, FT, and the untrained-weights control when present);
- the metric table: every metric and variant with its bootstrap interval, query
  counts and each baseline;
- per-layer plots (inline SVG) of every metric with its interval and baselines;
- layer x head heatmaps (attention mass on demonstrations, relaxation gap,
  ``|dW_ICL q| / |W_ZSL q|``, per-head SimAM) and the circuitsvis panels of the top
  heads by ``|dW_ICL q|`` with the query's attention under ZSL / ICL / FT.

Everything is inlined (circuitsvis's JavaScript once, SVG charts, CSS): the page opens
with networking off. Every dataset-derived string is escaped.

>>> from icl_lens.views.report import save_views, write_report
>>> save_views("runs/toy", model, prompt, ft_lr=cmp.lr, spec=task.spec)  # doctest: +SKIP
>>> write_report("runs/toy")                       # -> runs/toy/report.html  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.analyses import FRAME_COLUMNS
from icl_lens.views.viz import (
    AttentionComparison,
    Markup,
    MetaGradients,
    View,
    _fmt,
    _plain,
    atomic_write_text,
    attention_comparison,
    esc,
    head_summary,
    html_page,
    meta_gradients,
    overview_view,
    top_heads,
)

__all__ = [
    "RunData",
    "ViewData",
    "collect_views",
    "load_run",
    "render_report",
    "save_views",
    "write_report",
]

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.csv"
VIEWS_FILE = "views.json"
REPORT_FILE = "report.html"
METRIC_ORDER = ("rec2ftp", "simaou", "simam", "kendall")
PAPER_VARIANT = {"rec2ftp": "paper", "simaou": "normalised", "simam": "after", "kendall": "tau_b"}
METRIC_TITLES = {
    "rec2ftp": "Rec2FTP",
    "simaou": "SimAOU",
    "simam": "SimAM",
    "kendall": "Kendall",
}


# ---------------------------------------------------------------------------------------
# Per-token view data (views.json)
# ---------------------------------------------------------------------------------------


@dataclass
class ViewData:
    """What the circuitsvis panels of a report need, for one ICL prompt.

    ``meta_gradients``: the top heads' per-token terms; ``attention``: the query's
    attention under ZSL / ICL / FT at one layer; ``heads``: the per-(layer, head)
    summary of the decomposition (:func:`icl_lens.views.viz.head_summary`); ``query``: the
    query text; ``labels``: the label words (class 0, class 1) when known.
    """

    meta_gradients: list[MetaGradients]
    attention: AttentionComparison | None = None
    heads: pd.DataFrame | None = None
    query: str = ""
    labels: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(
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
        att = data.get("attention")
        heads = data.get("heads")
        labels = data.get("labels")
        return cls(
            meta_gradients=[MetaGradients.from_dict(m) for m in data.get("meta_gradients", [])],
            attention=None if att is None else AttentionComparison.from_dict(att),
            heads=None if heads is None else pd.DataFrame(heads),
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
            names = ", ".join(f"L{m.layer}H{m.head}" for m in self.meta_gradients)
            parts.append(Markup(f"<h3>Top heads by |dW_ICL q|: {esc(names)}</h3>"))
            parts += [m.view() for m in self.meta_gradients]
        if self.attention is not None:
            parts.append(self.attention.view())
        return View(*parts)


def _label_info(model, prompt, spec) -> tuple[tuple[int, int] | None, tuple[str, ...] | None]:
    """First label tokens (2-class tasks) and label words of ``spec``."""
    if spec is None:
        return None, None
    names = tuple(str(w).strip() for w in spec.label_words)
    if len(spec.label_words) != 2:
        return None, names
    from icl_lens.study.predict import label_tokens

    ids = label_tokens(model.tokenizer, spec).first
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
    from icl_lens.study.duality import decompose

    auto_ids, auto_names = _label_info(model, prompt, spec)
    label_tokens = label_tokens if label_tokens is not None else auto_ids
    names = tuple(labels) if labels is not None else auto_names
    pair = names if names is not None and len(names) == 2 and label_tokens else None
    dec = decompose(model, prompt, label_tokens=label_tokens)
    heads = top_heads(dec, k)
    mgs = [meta_gradients(dec, la, h, labels=pair) for la, h in heads]
    if ft_model is None and ft_lr is not None:
        from icl_lens.study.finetune import finetune

        result = finetune(model, prompt, lr=ft_lr, record_queries=False)
        if result.diverged:
            raise ValueError(f"finetuning at lr={ft_lr:g} diverged; pass a smaller ft_lr")
        ft_model = result.model
    attention = attention_comparison(model, prompt, layer=heads[0][0], ft_model=ft_model)
    if query is None:
        tokens = list(prompt.str_tokens)[prompt.query_start :]
        from icl_lens.views.viz import display_tokens

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


# ---------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A run's results (the ``results.json`` dict), tidy metric frame and view data."""

    results: dict[str, Any]
    metrics: pd.DataFrame
    views: ViewData | None = None
    source: str = ""


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
    return _normalise_frame(frame)


def _normalise_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for col in FRAME_COLUMNS:
        if col not in frame:
            frame[col] = np.nan if col not in ("metric", "variant", "baseline") else ""
    for col in ("metric", "variant", "baseline"):
        frame[col] = frame[col].astype(str)
    for col in ("layer", "head"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(-1).astype(int)
    for col in ("value", "ci_low", "ci_high", "n_queries", "n_skipped"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame[list(FRAME_COLUMNS)]


def _frame_from_summary(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The overall rows of a ``results.json`` ``"metrics"`` summary as a tidy frame."""
    rows = []
    for metric, entry in metrics.items():
        if not isinstance(entry, Mapping):
            continue
        variants = entry.get("variants") or {entry.get("variant") or "value": entry}
        for variant, v in variants.items():
            ci = v.get("ci") or [None, None]
            rows.append(
                {
                    "metric": metric,
                    "variant": variant,
                    "baseline": "none",
                    "layer": -1,
                    "head": -1,
                    "value": v.get("value"),
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "n_queries": v.get("n_queries"),
                    "n_skipped": v.get("n_skipped"),
                }
            )
            for name, value in (v.get("baselines") or {}).items():
                value = value.get("value") if isinstance(value, Mapping) else value
                rows.append(
                    {
                        "metric": metric,
                        "variant": variant,
                        "baseline": name,
                        "layer": -1,
                        "head": -1,
                        "value": value,
                    }
                )
    return _normalise_frame(pd.DataFrame(rows, columns=list(FRAME_COLUMNS)))


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
        frame = _normalise_frame(pd.DataFrame(results["table"]))
    else:
        frame = _frame_from_summary(results.get("metrics", {}))
    views = None
    if (directory / VIEWS_FILE).is_file():
        try:
            views = ViewData.load(directory)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{directory / VIEWS_FILE} is not valid view data: {err}") from err
    return RunData(results=results, metrics=frame, views=views, source=str(directory))


def _as_run(source: Any, views: ViewData | None) -> RunData:
    if isinstance(source, RunData):
        run = source
    elif isinstance(source, (str, os.PathLike)):
        run = load_run(source)
    elif hasattr(source, "to_dict") and hasattr(source, "metrics"):  # a Comparison
        results = source.to_dict()
        run = RunData(results=results, metrics=_normalise_frame(source.metrics()))
    else:
        raise TypeError(
            "write_report needs a run directory, a Comparison or RunData; "
            f"got {type(source).__name__}"
        )
    if views is not None:
        run.views = views
    return run


# ---------------------------------------------------------------------------------------
# SVG charts
# ---------------------------------------------------------------------------------------

PALETTE = ("#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#718096", "#319795", "#b7791f")


def bar_chart_svg(values: Mapping[str, float], *, title: str, width: int = 320) -> str:
    """Horizontal bars in [0, 1] (accuracies), labelled with their values."""
    row, left = 24, 70
    height = 26 + row * len(values)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<text x="0" y="14" font-size="12" font-weight="bold">{esc(title)}</text>',
    ]
    span = width - left - 50
    for i, (name, value) in enumerate(values.items()):
        y = 22 + i * row
        v = float(value) if value is not None and math.isfinite(float(value)) else float("nan")
        w = 0 if math.isnan(v) else max(0.0, min(1.0, v)) * span
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" font-size="12" text-anchor="end">{esc(name)}</text>'
        )
        out.append(
            f'<rect x="{left}" y="{y + 2}" width="{span}" height="{row - 8}" fill="#edf2f7"/>'
        )
        out.append(
            f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 8}" '
            f'fill="{PALETTE[i % len(PALETTE)]}"><title>{esc(name)}: {_fmt(v)}</title></rect>'
        )
        out.append(f'<text x="{left + span + 4}" y="{y + 14}" font-size="11">{_fmt(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def line_chart_svg(
    layers: Sequence[int],
    value: Sequence[float],
    *,
    ci_low: Sequence[float] | None = None,
    ci_high: Sequence[float] | None = None,
    baselines: Mapping[str, Sequence[float]] | None = None,
    title: str,
    width: int = 340,
    height: int = 200,
) -> str:
    """Value per layer (line and points) with its interval (band) and baselines
    (dashed lines), in inline SVG."""
    baselines = dict(baselines or {})
    x = np.asarray(layers, dtype=float)
    series = [np.asarray(value, dtype=float)]
    if ci_low is not None and ci_high is not None:
        series += [np.asarray(ci_low, dtype=float), np.asarray(ci_high, dtype=float)]
    series += [np.asarray(v, dtype=float) for v in baselines.values()]
    finite = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.array([])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 46, 10, 22, 34
    legend_h = 14 * (1 + len(baselines))
    total_h = height + legend_h
    x0, x1 = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (height - top - bottom)

    def path(ys: np.ndarray) -> str:
        pts, pen = [], "M"
        for xi, yi in zip(x, ys, strict=True):
            if math.isfinite(yi):
                pts.append(f"{pen}{px(xi):.1f},{py(yi):.1f}")
                pen = "L"
            else:
                pen = "M"
        return " ".join(pts)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_h}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<text x="0" y="14" font-size="12" font-weight="bold">{esc(title)}</text>',
        f'<line x1="{left}" y1="{py(0):.1f}" x2="{width - right}" y2="{py(0):.1f}" '
        'stroke="#a0aec0" stroke-width="0.8"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" '
        'stroke="#4a5568" stroke-width="0.8"/>',
    ]
    for tick in (lo + pad, (lo + hi) / 2, hi - pad):
        out.append(
            f'<text x="{left - 4}" y="{py(tick) + 3:.1f}" font-size="9" '
            f'text-anchor="end">{_fmt(tick, 2)}</text>'
        )
    step = max(1, math.ceil(len(x) / 12))  # at most ~12 layer labels
    for xi in x[::step]:
        out.append(
            f'<text x="{px(xi):.1f}" y="{height - bottom + 13}" font-size="9" '
            f'text-anchor="middle">L{int(xi)}</text>'
        )
    out.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" font-size="10" '
        'text-anchor="middle">layer</text>'
    )
    if ci_low is not None and ci_high is not None:
        lo_s, hi_s = series[1], series[2]
        ok = np.isfinite(lo_s) & np.isfinite(hi_s)
        if ok.any():
            upper = [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[ok], hi_s[ok], strict=True)]
            lower = [
                f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x[ok][::-1], lo_s[ok][::-1], strict=True)
            ]
            out.append(
                f'<polygon points="{" ".join(upper + lower)}" fill="#3182ce" fill-opacity="0.18"/>'
            )
    for i, (name, ys) in enumerate(baselines.items()):
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<path d="{path(np.asarray(ys, dtype=float))}" fill="none" stroke="{color}" '
            f'stroke-width="1.3" stroke-dasharray="4 3"><title>{esc(name)}</title></path>'
        )
    ys = series[0]
    out.append(f'<path d="{path(ys)}" fill="none" stroke="#2b6cb0" stroke-width="2"/>')
    for xi, yi in zip(x, ys, strict=True):
        if math.isfinite(yi):
            out.append(
                f'<circle cx="{px(xi):.1f}" cy="{py(yi):.1f}" r="3" fill="#2b6cb0">'
                f"<title>L{int(xi)}: {_fmt(yi)}</title></circle>"
            )
    y = height + 8
    out.append(
        f'<line x1="{left}" y1="{y}" x2="{left + 18}" y2="{y}" stroke="#2b6cb0" stroke-width="2"/>'
    )
    out.append(f'<text x="{left + 22}" y="{y + 3}" font-size="10">value (band: CI)</text>')
    for i, name in enumerate(baselines):
        y += 14
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<line x1="{left}" y1="{y}" x2="{left + 18}" y2="{y}" stroke="{color}" '
            'stroke-dasharray="4 3"/>'
        )
        out.append(f'<text x="{left + 22}" y="{y + 3}" font-size="10">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _metric_sort(frame: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = list(dict.fromkeys(zip(frame["metric"], frame["variant"], strict=True)))

    def key(p: tuple[str, str]) -> tuple[int, int, str]:
        m, v = p
        rank = METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER)
        return rank, 0 if PAPER_VARIANT.get(m) == v else 1, v

    return sorted(pairs, key=key)


def _run_section(results: Mapping[str, Any]) -> str:
    config = results.get("config") or {}
    info = results.get("info") or {}
    rows = []
    for key in ("task_name", "shots", "seed", "order_seed", "balanced", "protocol", "n_queries"):
        if key in config:
            rows.append((key, config[key]))
    for key in ("k_effective", "demonstration_tokens", "model_line"):
        if key in info:
            rows.append((key, info[key]))
    lr = results.get("lr")
    if isinstance(lr, Mapping) and lr.get("selected") is not None:
        rows.append(("FT learning rate", lr["selected"]))
    if not rows:
        return ""
    cells = "".join(f'<tr><th>{esc(k)}</th><td class="text">{esc(v)}</td></tr>' for k, v in rows)
    return f'<h2>Run</h2><table class="data">{cells}</table>'


def _accuracy_section(results: Mapping[str, Any]) -> str:
    acc = results.get("accuracy") or {}
    names = {"zsl": "ZSL", "icl": "ICL", "ft": "FT"}
    shown = {names.get(k, str(k)): _num(v) for k, v in acc.items()}
    header = "".join(f"<th>{esc(k)}</th>" for k in shown)
    cells = "".join(f"<td>{_fmt(v)}</td>" for v in shown.values())
    table = f'<table class="data"><tr><th></th>{header}</tr><tr><th>accuracy</th>{cells}</tr>'
    control = results.get("control") or {}
    c_acc = control.get("accuracy") if isinstance(control, Mapping) else None
    if c_acc:
        c_cells = "".join(f"<td>{_fmt(c_acc.get(k))}</td>" for k in acc)
        table += f"<tr><th>untrained weights (control)</th>{c_cells}</tr>"
    table += "</table>"
    chart = bar_chart_svg(shown, title="validation accuracy")
    return f'<h2>Accuracy</h2><div class="row">{table}{chart}</div>'


def _metrics_section(frame: pd.DataFrame) -> str:
    overall = frame[(frame["layer"] < 0) & (frame["head"] < 0)]
    if overall.empty:
        return "<h2>Metrics</h2><p>No metric rows in this run.</p>"
    baselines = [b for b in dict.fromkeys(overall["baseline"]) if b != "none"]
    head = "".join(f"<th>{esc(b)}</th>" for b in baselines)
    rows = []
    for metric, variant in _metric_sort(overall):
        sub = overall[(overall["metric"] == metric) & (overall["variant"] == variant)]
        obs = sub[sub["baseline"] == "none"]
        if obs.empty:
            continue
        o = obs.iloc[0]
        by_base = {r.baseline: r.value for r in sub.itertuples()}
        paper = PAPER_VARIANT.get(metric) == variant
        name = METRIC_TITLES.get(metric, metric)
        cls = ' class="paper"' if paper else ""
        base_cells = "".join(f"<td>{_fmt(by_base.get(b))}</td>" for b in baselines)
        rows.append(
            f'<tr{cls}><td class="text">{esc(name)}</td><td class="text">{esc(variant)}'
            f"{' (paper)' if paper else ''}</td><td><b>{_fmt(o.value)}</b></td>"
            f"<td>[{_fmt(o.ci_low)}, {_fmt(o.ci_high)}]</td><td>{_count(o.n_queries)}</td>"
            f"<td>{_count(o.n_skipped)}</td>{base_cells}</tr>"
        )
    return (
        "<h2>Metrics</h2>"
        '<p class="note">Value: mean over queries, then heads, then layers; interval: '
        "95% bootstrap over queries. Baselines are the same statistic under each null "
        "(random directions, shuffled pairing, untrained weights).</p>"
        '<div style="overflow-x:auto"><table class="data"><tr><th>metric</th><th>variant</th>'
        f"<th>value</th><th>95% CI</th><th>queries</th><th>skipped</th>{head}</tr>"
        f"{''.join(rows)}</table></div>"
    )


def _count(x: Any) -> str:
    v = _num(x)
    return "n/a" if not math.isfinite(v) else str(int(v))


def _per_layer_section(frame: pd.DataFrame) -> str:
    per_layer = frame[(frame["layer"] >= 0) & (frame["head"] < 0)]
    charts = []
    for metric, variant in _metric_sort(per_layer):
        sub = per_layer[(per_layer["metric"] == metric) & (per_layer["variant"] == variant)]
        obs = sub[sub["baseline"] == "none"].sort_values("layer")
        if obs.empty:
            continue
        layers = obs["layer"].tolist()
        bases = {}
        for name, rows in sub[sub["baseline"] != "none"].groupby("baseline", sort=False):
            rows = rows.set_index("layer")["value"]
            bases[name] = [rows.get(la, float("nan")) for la in layers]
        charts.append(
            line_chart_svg(
                layers,
                obs["value"].tolist(),
                ci_low=obs["ci_low"].tolist(),
                ci_high=obs["ci_high"].tolist(),
                baselines=bases,
                title=f"{METRIC_TITLES.get(metric, metric)} ({variant}) per layer",
            )
        )
    if not charts:
        return ""
    return (
        '<h2>Per layer</h2><div class="charts">'
        + "".join(f"<div>{c}</div>" for c in charts)
        + "</div>"
    )


REPORT_STYLE_EXTRA = """
h1{font-size:24px;margin:0 0 6px}
h2{font-size:19px;margin:26px 0 8px;border-bottom:1px solid #e2e8f0}
.icl-lens-view .row,.icl-lens-view .charts{display:flex;flex-wrap:wrap;gap:24px;
align-items:flex-start}
.icl-lens-view tr.paper td{background:#f0fff4}
.icl-lens-view table.data th{text-align:left}
footer{margin-top:30px;color:#718096;font-size:12px}
"""


def render_report(source: Any, *, views: ViewData | None = None, title: str | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    from icl_lens import __version__
    from icl_lens.views.viz import PAGE_STYLE

    run = _as_run(source, views)
    results = run.results
    task = (results.get("config") or {}).get("task_name") or (results.get("info") or {}).get("task")
    title = title or (f"icl-lens report: {task}" if task else "icl-lens report")
    parts: list[Any] = [Markup(f"<h1>{esc(title)}</h1>")]
    if run.source:
        parts.append(Markup(f'<p class="note">Run directory: {esc(run.source)}</p>'))
    parts.append(Markup(_run_section(results)))
    parts.append(Markup(_accuracy_section(results)))
    parts.append(Markup(_metrics_section(run.metrics)))
    parts.append(Markup(_per_layer_section(run.metrics)))
    heads = run.views.heads if run.views is not None else None
    has_head_metrics = bool((run.metrics["layer"] >= 0).any())
    if heads is not None or has_head_metrics:
        parts.append(overview_view(heads, run.metrics if has_head_metrics else None))
    parts.append(Markup("<h2>Meta-gradients of the top heads</h2>"))
    if run.views is not None and (run.views.meta_gradients or run.views.attention):
        v = run.views
        if v.query:
            parts.append(
                Markup(
                    f'<p class="note">Example query: <span class="query">{esc(v.query)}</span></p>'
                )
            )
        if v.labels:
            labels = ", ".join(f"class {i}: {w}" for i, w in enumerate(v.labels))
            parts.append(Markup(f'<p class="note">Label words: {esc(labels)}</p>'))
        parts.append(v.view())
    else:
        parts.append(
            Markup(
                '<p class="note">No per-token data in this run (views.json); write it with '
                "icl_lens.views.report.save_views(DIR, model, prompt, ft_lr=...).</p>"
            )
        )
    parts.append(
        Markup(
            f"<footer>icl-lens {esc(__version__)}; self-contained page, no network needed.</footer>"
        )
    )
    body = View(*parts).local_src
    return html_page(title, body, style=PAGE_STYLE + REPORT_STYLE_EXTRA)


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
    ``views`` (:func:`collect_views`) adds or replaces the circuitsvis panels.

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
