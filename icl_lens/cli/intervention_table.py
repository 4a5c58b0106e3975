"""The compact terminal table of ``icl-lens run --interventions``.

Per condition the mean margin and accuracy, and the share of ICL's margin effect it
recovers (Restore, Transplant, FT, the task vector) or removes (Knockout) with its
interval; the all-heads rows, FT and the task vector, the top-k curve at a few k beside
k random heads, then the controls. A share that cannot speak carries a note number,
its reason printed under the table (docs/interventions.md says what each row means).
"""

from __future__ import annotations

import pandas as pd

from icl_lens.cli.tables import _notes, _num, _render

__all__ = ["format_interventions"]

SHOWN_K = (1, 4, 16)
"""The k of the top-k curve the table shows (and every head)."""


def _name(row) -> str:
    name = row["intervention"]
    if row["form"]:
        name += f"({row['form']})"
    if row["intervention"] == "task_vector":
        name += f" L{row['layer']}"
    if row["scope"] in ("top_k", "random_k"):
        name = f"{name} {row['scope'].replace('_k', '')}-{row['k']}"
    if row["control"] not in ("none", "random_heads"):
        name += f" [{row['control']}]"
    return name


def _rows(frame: pd.DataFrame, keys: pd.DataFrame, notes: list[str]) -> list[list[str]]:
    out = []
    for _, key in keys.iterrows():
        same = (frame[list(keys.columns)] == key.values).all(axis=1)
        rows = frame[same]
        values = rows[rows["quantity"] == "value"].set_index("metric")["value"]
        share = rows[(rows["quantity"] != "value") & (rows["metric"] == "margin")]
        cells = [_name(key), _num(values.get("margin"), 3), _num(values.get("accuracy"), 3)]
        if len(share):
            s = share.iloc[0]
            mark = _notes(share["flag"], notes)[0]
            cells += [s["quantity"], _num(s["value"], 3), _num(s["ci_low"], 3)]
            cells += [_num(s["ci_high"], 3), mark]
        else:
            cells += ["", "", "", "", ""]
        out.append(cells)
    return out


def format_interventions(result) -> str:
    """The table of an :class:`~icl_lens.Interventions` (see the module docstring)."""
    f = result.frame
    key_cols = ["intervention", "form", "scope", "layer", "head", "k", "control"]
    keys = f[key_cols].drop_duplicates()
    model = keys[(keys["scope"] == "model") & (keys["control"] == "none")]
    total = int(keys["k"].max())
    shown = [k for k in (*SHOWN_K, total) if k <= total]
    curve = keys[keys["scope"].isin(["top_k", "random_k"]) & keys["k"].isin(shown)]
    curve = curve[curve["intervention"].isin(["restore", "knockout"]) | (curve["form"] == "fitted")]
    curve = curve.sort_values(["k", "scope"], kind="stable")
    controls = keys[(keys["scope"] == "model") & (keys["control"] != "none")]
    notes: list[str] = []
    header = ["condition", "margin", "accuracy", "share", "value", "ci_low", "ci_high", "note"]
    parts = []
    for title, part in (
        ("all heads, FT, task vector", model),
        ("top-k heads by necessity (random-k: 3 random draws)", curve),
        ("controls (shares of the real prompt's ICL effect)", controls),
    ):
        if len(part):
            parts.append(f"{title}:\n" + _render(_rows(f, part, notes), header, left=1))
    i = result.info
    lines = [
        f"interventions: {i.get('task')}, k={i.get('k_effective')}, "
        f"{i.get('n_queries')} queries, scales fitted on {i['fit_queries']['used']} held-out "
        f"examples; |Blind - ZSL| logits up to {i.get('blind_vs_zsl', float('nan')):.3g}",
        *parts,
    ]
    lines += [f"[{n}] {text}" for n, text in enumerate(notes, 1)]
    lines += [f"note: {flag}" for flag in result.flags]
    return "\n".join(lines)
