"""Views of the causal tests of the dual form (interventions.md): which heads carry ICL's
effect, how much of it the top heads restore or remove, and what a transplanted update
reads from the demonstrations.

- :func:`plot_heads`: layer x head heatmaps of removed(Knockout({h})) (necessity) and
  recovered(Restore({h})), recovered(Transplant({h}, linear | fitted)) (sufficiency);
- :func:`plot_curve`: recovered by Restore / Transplant(top-k) and removed by
  Knockout(top-k) against k, the random-heads control beside them, FT's and the task
  vector's recovery as reference lines;
- :func:`view_transplant`: circuitsvis, one head's transplanted update ``dW_ICL q_t``
  (q_t from the Blind forward) token by token, through W_O onto the label direction
  (:func:`transplant_terms`, the meta-gradient view's machinery).

All take an ``Interventions`` result, an ``InterventionSet`` (its ``table()``) or the
tidy frame itself (columns: INTERVENE.md; :data:`COLUMNS`).

>>> frame = pd.DataFrame({"intervention": ["knockout", "restore"] * 2, "form": "",
...     "scope": "head", "layer": [0, 0, 1, 1], "head": 0, "k": -1, "control": "none",
...     "metric": "margin", "quantity": ["removed", "recovered"] * 2,
...     "value": [0.5, 0.25, 0.0, 0.75], "flag": None})
>>> fig = plot_heads(frame)
>>> [ax.get_title().split(":")[0] for ax in fig.axes if ax.images]
['necessity', 'sufficiency']
>>> fig.axes[0].images[0].get_array().tolist()
[[0.5], [0.0]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from icl_lens.data.prompts import Prompt
from icl_lens.hooks.interventions import blind
from icl_lens.model.adapter import adapt
from icl_lens.study.duality import decompose
from icl_lens.views.figures import STYLE, heatmap, new_figure, panel_size, text
from icl_lens.views.meta_gradients import MetaGradients, meta_gradients
from icl_lens.views.page import View

__all__ = [
    "COLUMNS",
    "intervention_frame",
    "plot_curve",
    "plot_heads",
    "query_prompt",
    "transplant_data",
    "transplant_terms",
    "view_transplant",
]

COLUMNS = (
    "intervention",
    "form",
    "scope",
    "layer",
    "head",
    "k",
    "control",
    "metric",
    "quantity",
    "value",
)
"""Columns the views read (``ci_low``, ``ci_high`` and ``flag`` are used where present)."""

HEAD_PANELS = (
    ("knockout", "", "removed", "necessity: removed by Knockout({h})"),
    ("restore", "", "recovered", "sufficiency: recovered by Restore({h})"),
    ("transplant", "linear", "recovered", "recovered by Transplant({h}, linear)"),
    ("transplant", "fitted", "recovered", "recovered by Transplant({h}, fitted)"),
)
"""The per-head heatmaps: (intervention, form, quantity, title)."""

CURVES = (
    ("restore", "", "recovered", "Restore(top-k)", "#2b6cb0"),
    ("transplant", "linear", "recovered", "Transplant(top-k, linear)", "#d69e2e"),
    ("transplant", "fitted", "recovered", "Transplant(top-k, fitted)", "#38a169"),
    ("knockout", "", "removed", "Knockout(top-k)", "#c53030"),
)
"""The top-k curves: (intervention, form, quantity, label, colour)."""

REFERENCES = (
    ("ft", "FT recovered", "#805ad5"),
    ("task_vector", "task vector recovered", "#718096"),
)
RANDOM_LABEL = "k random heads (dashed; band: draws or 95% CI)"
SCALE_NOTE = (
    "{quantity}: fraction of ICL's effect on the {metric}, m(ICL) - m(Blind) (1: all, 0: none)"
)


def intervention_frame(result) -> pd.DataFrame:
    """The tidy frame of ``result`` (``Interventions.frame``, ``InterventionSet.table()``
    or the frame itself), checked for the columns the views read."""
    if isinstance(result, pd.DataFrame):
        frame = result
    elif isinstance(getattr(result, "frame", None), pd.DataFrame):
        frame = result.frame
    elif callable(getattr(result, "table", None)):
        frame = result.table()
    else:
        raise TypeError(
            "expected the result of il.intervene (Interventions), of il.intervene_runs "
            f"(InterventionSet) or their tidy frame; got {type(result).__name__}"
        )
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise ValueError(
            f"the frame lacks the columns {missing}: pass Interventions.frame (or "
            "InterventionSet.table()) as il.intervene writes it"
        )
    return frame


def _select(frame: pd.DataFrame, metric: str, control: str) -> pd.DataFrame:
    metrics = sorted(set(frame["metric"]))
    if metric not in metrics:
        raise ValueError(f"metric {metric!r} is not in the frame; choose from {metrics}")
    return frame[(frame["metric"] == metric) & (frame["control"] == control)]


def _rows(frame: pd.DataFrame, intervention: str, form: str, quantity: str) -> pd.DataFrame:
    form_col = frame["form"].fillna("").astype(str)
    return frame[
        (frame["intervention"] == intervention)
        & (form_col == form)
        & (frame["quantity"] == quantity)
    ]


# ---------------------------------------------------------------------------------------
# Per head
# ---------------------------------------------------------------------------------------


def plot_heads(
    result, *, metric: str = "margin", control: str = "none", ncols: int | None = None
) -> Figure:
    """Layer x head heatmaps of one value per head: removed by Knockout({h}), recovered
    by Restore({h}), Transplant({h}, linear) and Transplant({h}, fitted), each a fraction
    of ICL's effect m(ICL) - m(Blind) on ``metric`` (``margin`` or ``accuracy``).

    Colours diverge at 0 (red: toward ICL's effect, blue: against it), each panel on its
    own symmetric scale (a linear transplant's values are not softmax's size); undefined
    values (ICL does not move the metric beyond its interval) are grey, marked ``n/a``.
    ``control``: the frame's ``control`` column (``none``: the real demonstrations).
    """
    frame = _select(intervention_frame(result), metric, control)
    heads = frame[frame["scope"] == "head"]
    grids: list[tuple[str, pd.DataFrame]] = []
    for intervention, form, quantity, title in HEAD_PANELS:
        rows = _rows(heads, intervention, form, quantity)
        if rows.empty:
            continue
        twice = rows.duplicated(["layer", "head"])
        if twice.any():
            pair = rows[twice].iloc[0]
            raise ValueError(
                f"{title}: head L{pair['layer']}H{pair['head']} has several values; pass the "
                "frame of one result (Interventions.frame or InterventionSet.table())"
            )
        grid = rows.pivot(index="layer", columns="head", values="value").astype(float)
        grids.append((title, grid.sort_index().sort_index(axis=1)))
    if not grids:
        scopes = sorted(set(intervention_frame(result)["scope"]))
        why = (
            "the result has no head scan (computed with head_scan=False, --no-head-scan): "
            "rerun with head_scan=True for the heatmaps; plot_curve needs no scan"
            if "head" not in scopes
            else f"the frame has scopes {sorted(set(frame['scope']))} there"
        )
        raise ValueError(f"no per-head rows for metric {metric!r} and control {control!r}: {why}")
    fig, axes = new_figure(len(grids), panel=panel_size(grids[0][1]), ncols=ncols)
    undefined = False
    for ax, (title, grid) in zip(axes, grids, strict=True):
        heatmap(ax, grid, title=title, diverging=True)
        quantity = title.split(" by ")[0].split(": ")[-1]
        ax.images[0].colorbar.set_label(f"{quantity} (fraction)", fontsize=7)
        undefined |= _mark_undefined(ax, grid)
    note = SCALE_NOTE.format(quantity="removed, recovered", metric=metric)
    if undefined:
        note += "; grey n/a: undefined (ICL does not move it beyond its interval)"
    with matplotlib.rc_context(STYLE):
        fig.suptitle(text(note), fontsize=8)
    return fig


def _mark_undefined(ax: Axes, grid: pd.DataFrame) -> bool:
    """Write ``n/a`` on the grey (NaN) cells; True if there is one."""
    values = grid.to_numpy(dtype=float)
    missing = np.argwhere(~np.isfinite(values))
    for i, j in missing:
        ax.text(j, i, "n/a", ha="center", va="center", fontsize=6, color="#4a5568")
    return len(missing) > 0


# ---------------------------------------------------------------------------------------
# Top-k curves
# ---------------------------------------------------------------------------------------


def plot_curve(result, *, metric: str = "margin") -> Figure:
    """Recovered by Restore(top-k), Transplant(top-k, linear | fitted) (left) and removed
    by Knockout(top-k) (right) against k, heads ranked by necessity on the fit queries;
    the same for k random heads (dashed, the draws' range as a band), FT's and the task
    vector's recovery (horizontal lines), 95% intervals as error bars where the frame
    has them. The y range is the values' (with 0 and 1): a far wider interval runs off
    the panel.

    >>> frame = pd.DataFrame({"intervention": ["restore", "restore", "ft"], "form": "",
    ...     "scope": ["top_k", "top_k", "model"], "layer": -1, "head": -1, "k": [1, 2, -1],
    ...     "control": "none", "metric": "margin", "quantity": "recovered",
    ...     "value": [0.5, 0.75, 0.5]})
    >>> fig = plot_curve(frame)
    >>> line = [x for x in fig.axes[0].lines if x.get_label() == "Restore(top-k)"][0]
    >>> line.get_xdata().tolist(), line.get_ydata().tolist()
    ([1, 2], [0.5, 0.75])
    """
    frame = intervention_frame(result)
    frame = frame[frame["metric"] == metric] if metric in set(frame["metric"]) else None
    if frame is None:
        raise ValueError(f"metric {metric!r} is not in the frame")
    top = frame[(frame["scope"] == "top_k") & (frame["control"] == "none")]
    rand = frame[frame["scope"] == "random_k"]
    if top.empty and rand.empty:
        raise ValueError(
            "no top-k rows (scope 'top_k' or 'random_k') to plot: the frame has scopes "
            f"{sorted(set(frame['scope']))}"
        )
    fig, (left, right) = new_figure(2, panel=(3.6, 2.8))
    with matplotlib.rc_context(STYLE):
        for intervention, form, quantity, label, colour in CURVES:
            ax = right if quantity == "removed" else left
            _curve(ax, _rows(top, intervention, form, quantity), label, colour)
            _random_band(ax, _rows(rand, intervention, form, quantity), colour)
        model = frame[(frame["scope"] == "model") & (frame["control"] == "none")]
        for intervention, label, colour in REFERENCES:
            rows = _rows(model, intervention, "", "recovered")
            if len(rows) and math.isfinite(float(rows["value"].iloc[0])):
                left.axhline(float(rows["value"].iloc[0]), color=colour, ls=":", lw=1.3,
                             label=label)  # fmt: skip
        ks = sorted({int(k) for k in pd.concat([top, rand])["k"] if int(k) > 0})
        for ax, title in ((left, "sufficiency: recovered"), (right, "necessity: removed")):
            ax.axhline(1.0, color="#a0aec0", lw=0.6, zorder=0)
            ax.axhline(0.0, color="#a0aec0", lw=0.6, zorder=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("k heads (ranked by necessity on the fit queries)")
            ax.set_title(title)
            _fit_lines(ax)
        left.set_ylabel(f"fraction of ICL's effect on the {metric}")
        handles = {}
        for ax in (left, right):
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        if len(rand):
            handles[RANDOM_LABEL] = Line2D([], [], color="#718096", ls="--", lw=1.0)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 3))  # fmt: skip
        fig.suptitle(text(SCALE_NOTE.format(quantity="recovered, removed", metric=metric)),
                     fontsize=8)  # fmt: skip
    return fig


def _fit_lines(ax: Axes, pad: float = 0.12) -> None:
    """The y range of the lines' values (and 0 and 1), padded: an interval or band far
    wider than the values runs off the panel instead of flattening every line."""
    values = [0.0, 1.0]
    for line in ax.lines:
        if line.get_linestyle() in ("None", "none", ""):  # an error bar's caps
            continue
        y = np.asarray(line.get_ydata(), dtype=float)
        values += y[np.isfinite(y)].tolist()
    low, high = min(values), max(values)
    margin = pad * (high - low)
    ax.set_ylim(low - margin, high + margin)


def _curve(ax: Axes, rows: pd.DataFrame, label: str, colour: str) -> None:
    if rows.empty:
        return
    rows = rows.sort_values("k")
    k, value = rows["k"].to_numpy(dtype=int), rows["value"].to_numpy(dtype=float)
    if {"ci_low", "ci_high"} <= set(rows) and rows[["ci_low", "ci_high"]].notna().any().all():
        low = value - rows["ci_low"].to_numpy(dtype=float)
        high = rows["ci_high"].to_numpy(dtype=float) - value
        err = np.nan_to_num(np.vstack([low, high]).clip(min=0))
        ax.errorbar(k, value, yerr=err, fmt="none", ecolor=colour, elinewidth=0.9, capsize=2,
                    label=f"_{label} 95% CI")  # fmt: skip
    ax.plot(k, value, "o-", color=colour, lw=1.6, ms=3.5, label=label)


def _random_band(ax: Axes, rows: pd.DataFrame, colour: str) -> None:
    """The random-heads control: its mean per k (dashed), the draws' range or the
    interval as a band."""
    if rows.empty:
        return
    by_k = rows.groupby("k")["value"]
    k = np.array(sorted(int(x) for x in by_k.groups))
    mean = by_k.mean().reindex(k).to_numpy(dtype=float)
    low, high = by_k.min().reindex(k), by_k.max().reindex(k)
    if (by_k.size() == 1).all() and {"ci_low", "ci_high"} <= set(rows):
        low = rows.groupby("k")["ci_low"].first().reindex(k)
        high = rows.groupby("k")["ci_high"].first().reindex(k)
    ok = (low.notna() & high.notna()).to_numpy()
    if ok.any():
        ax.fill_between(k[ok], low.to_numpy(float)[ok], high.to_numpy(float)[ok],
                        color=colour, alpha=0.12, linewidth=0)  # fmt: skip
    ax.plot(k, mean, "--", color=colour, lw=1.0, alpha=0.8)


# ---------------------------------------------------------------------------------------
# One head's transplanted update, token by token
# ---------------------------------------------------------------------------------------


def transplant_terms(
    model,
    prompt,
    layer: int,
    head: int,
    *,
    label_tokens: tuple[int, int] | None = None,
    labels: tuple[str, str] | None = None,
    scale: float | None = None,
) -> MetaGradients:
    """Each demonstration token's term ``v_i (k_i . q_t)`` of the update that
    Transplant({(layer, head)}, linear) adds at ``prompt``'s prediction position, with
    q_t from the Blind forward (every head knocked out): the meta-gradient view's values
    (:func:`~icl_lens.views.meta_gradients.meta_gradients`) of
    ``decompose(..., intervention=blind(adapter))``.

    ``label_tokens=(a, b)`` adds each term's effect on ``logit[b] - logit[a]`` (through
    W_O, the frozen norms of the Blind forward); ``labels`` names them; ``scale`` (the
    fitted c_h) is shown beside the update.

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> mg = transplant_terms(model, p, layer=1, head=0)
    >>> mg.kind, list(mg.values), mg.values["norm"][p.query_start:]
    ('transplant', ['along the update', 'norm', 'k.q'], [0.0])
    """
    adapter = adapt(model)
    dec = decompose(
        adapter, prompt, layers=[layer], label_tokens=label_tokens, intervention=blind(adapter)
    )
    mg = meta_gradients(dec, layer, head, labels=labels, transplant=True)
    if scale is not None:
        mg.stats["fitted_scale"] = float(scale)
    return mg


def query_prompt(result, query: int, tokenizer=None) -> Prompt:
    """The ICL prompt of measured query ``query`` of an ``Interventions`` result: its
    demonstrations (``result.prompt``'s prefix) and ``result.queries[query]``, labelled
    with the query's gold class; token strings from ``tokenizer`` when given."""
    prompt, queries = getattr(result, "prompt", None), getattr(result, "queries", None)
    if prompt is None or not queries:
        raise ValueError(
            "this result holds no prompt and queries (an older interventions.json?): run "
            "il.intervene again, or pass the ICL prompt itself to view_transplant"
        )
    if isinstance(query, bool) or not isinstance(query, int) or not 0 <= query < len(queries):
        raise IndexError(f"query must be an int in 0..{len(queries) - 1} (a measured query)")
    tokens = queries[query].long().cpu()
    strings = ()
    if prompt.str_tokens and tokenizer is not None:
        strings = (
            *prompt.str_tokens[: prompt.query_start],
            *tokenizer.convert_ids_to_tokens(tokens.tolist()),
        )
    return dataclasses.replace(
        prompt,
        tokens=torch.cat([prompt.prefix.cpu(), tokens]),
        str_tokens=strings,
        label=int(result.gold[query]),
    )


def transplant_data(
    result, model, layer: int | None = None, head: int | None = None, query: int = 0
) -> MetaGradients:
    """:func:`transplant_terms` for measured query ``query`` of an ``Interventions``
    result and head ``(layer, head)`` (default: the most necessary head, ``ranking[0]``):
    on the label direction toward the query's gold label word (against the first other
    one: for two classes, the margin's own direction), with the head's fitted c_h."""
    if (layer is None) != (head is None):
        raise ValueError("give both layer and head, or neither for the most necessary head")
    if layer is None:
        if not result.ranking:
            raise ValueError("the result ranks no head: give layer and head")
        layer, head = result.ranking[0]
    adapter = adapt(model)
    tokenizer = getattr(adapter.model, "tokenizer", None)
    prompt = query_prompt(result, query, tokenizer)
    ids = [int(x) for x in result.label_ids]
    pair = names = None
    if len(ids) >= 2 and prompt.label is not None:
        gold = prompt.label
        other = next(i for i in range(len(ids)) if i != gold)
        pair = (ids[other], ids[gold])
        if tokenizer is not None:
            names = tuple(tokenizer.decode([i]).strip() or str(i) for i in pair)
    scale = float(result.scales[layer, head]) if result.scales is not None else None
    return transplant_terms(
        adapter, prompt, layer, head, label_tokens=pair, labels=names, scale=scale
    )


def view_transplant(
    result_or_data,
    model=None,
    layer: int | None = None,
    head: int | None = None,
    query: int = 0,
    **options,
) -> View:
    """circuitsvis view of one head's transplanted update: the demonstration tokens
    coloured by their term ``v_i (k_i . q_t)`` (q_t from the Blind forward) through W_O
    onto the label direction.

    ``result_or_data``: an ``Interventions`` result (with ``model``; ``layer``,
    ``head``: default the most necessary head; ``query``: which measured query;
    :func:`transplant_data`), :class:`~icl_lens.views.meta_gradients.MetaGradients` of
    :func:`transplant_terms` (stored data; no model needed), or a
    :class:`~icl_lens.data.prompts.Prompt` with ``model``, ``layer``, ``head`` (and the
    ``options`` of :func:`transplant_terms`).
    """
    if isinstance(result_or_data, MetaGradients):
        if result_or_data.kind != "transplant":
            raise ValueError(
                "these are the ICL forward's meta-gradients (kind 'icl'); a transplant view "
                "shows transplant_terms(...) (q from the Blind forward)"
            )
        return result_or_data.view()
    if model is None:
        raise ValueError("give the model whose transplanted update to show")
    if isinstance(result_or_data, Prompt):
        if layer is None or head is None:
            raise ValueError("give the model, layer and head whose transplanted update to show")
        return transplant_terms(model, result_or_data, layer, head, **options).view()
    return transplant_data(result_or_data, model, layer, head, query).view()


def _ranked(frame: pd.DataFrame, by: Sequence[str] = ("knockout", "removed")) -> pd.DataFrame:
    """Per-head rows of ``by`` sorted by value, largest first (NaN last)."""
    rows = _rows(frame[frame["scope"] == "head"], by[0], "", by[1])
    return rows.sort_values("value", ascending=False, na_position="last")
