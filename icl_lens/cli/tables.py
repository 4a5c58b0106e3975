"""Plain-text tables of a comparison and of several runs, for the terminal and README.

Values to 4 decimals, accuracies to 3; a baseline that does not apply is blank; the
untrained-weights control shows its mean over draws and their standard deviation; a
value that cannot speak carries a note number, its reason printed under the table.
"""

from __future__ import annotations

import math

import pandas as pd

SHORT = {
    "independent": "indep",
    "random_uniform": "uniform",
    "random_gaussian": "gauss",
    "shuffled_queries": "shuf_q",
    "shuffled_heads": "shuf_h",
    "icl_retest": "icl_rt",
    "ft_retest": "ft_rt",
    "untrained_weights": "untrained",
}
"""Column headers of the baselines (their ``baseline`` names are in the legend)."""

LEGEND = (
    "baselines: indep = Rec2FTP if ICL and FT were independent; uniform, gauss = a random "
    "vector (the paper's, a centred one);\n"
    "shuf_q, shuf_h = FT of another query, another head; icl_rt = ICL vs ICL in another "
    "order; ft_rt = FT vs FT trained in another order;\n"
    "untrained = the same architecture with random weights (mean over draws, +- their sd)"
)


def _num(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.{digits}f}"


def _notes(flags: pd.Series, notes: list[str]) -> list[str]:
    """A ``[n]`` mark per row with a flag, numbering each distinct text once."""
    marks = []
    for flag in flags:
        if isinstance(flag, str) and flag:
            if flag not in notes:
                notes.append(flag)
            marks.append(f"[{notes.index(flag) + 1}]")
        else:
            marks.append("")
    return marks


def _render(rows: list[list[str]], header: list[str], left: int) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _spread(cmp, mode: str) -> dict:
    control = cmp.control or {}
    return (control.get("spread") or {}).get(mode) or {}


def _header(baselines) -> list[str]:
    """A metric table's columns: the value, its interval, each baseline, the note."""
    return [
        "metric",
        "variant",
        "value",
        "ci_low",
        "ci_high",
        *(SHORT.get(b, b) for b in baselines),
        "note",
    ]


def format_table(cmp, *, legend: bool = False) -> str:
    """Accuracies, then per FT mode one row per metric and variant: value, CI, every
    baseline, and a note mark; the notes (flags of the rows and of the run) below."""
    acc = "  ".join(f"{k} {v:.3f}" for k, v in cmp.accuracy.items())
    lines = [f"accuracy  {acc}   (k={cmp.info.get('k_effective')})"]
    notes: list[str] = []
    modes = list(cmp.ft_modes) or [None]
    for mode in modes:
        entry = cmp.ft_modes.get(mode, {}) if mode else {}
        lr = entry.get("lr", cmp.lr)
        lines.append(f"\nFT {mode or 'standard'}, lr {lr:g}")
        table = cmp.table(mode)
        flags = table.pop("flag") if "flag" in table else pd.Series([None] * len(table))
        overall = cmp.metrics().query("layer == -1 and head == -1")
        if mode and "ft_mode" in overall:
            overall = overall[overall["ft_mode"] == mode]
        applies = set(zip(overall["metric"], overall["variant"], overall["baseline"], strict=True))
        baselines = [b for b in table.columns[3:]]
        spread = _spread(cmp, mode)
        header = _header(baselines)
        rows = []
        for ((metric, variant), row), mark in zip(
            table.iterrows(), _notes(flags, notes), strict=True
        ):
            cells = [metric, variant, _num(row["value"]), _num(row["ci_low"]), _num(row["ci_high"])]
            for b in baselines:
                if (metric, variant, b) not in applies:
                    cells.append("")
                elif b == "untrained_weights" and (sd := spread.get(metric, {}).get(variant)):
                    spread_text = "" if math.isnan(sd["std"]) else f"+-{_num(sd['std'], 2)}"
                    cells.append(_num(row[b]) + spread_text)
                else:
                    cells.append(_num(row[b]))
            rows.append([*cells, mark])
        lines.append(_render(rows, header, left=2))
    run_notes = list(cmp.flags)
    for i, text in enumerate(notes, 1):
        lines.append(f"[{i}] {text}")
    lines += [f"note: {text}" for text in run_notes]
    if legend:
        lines.append(LEGEND)
    return "\n".join(lines)


def format_aggregate(table: pd.DataFrame, *, title: str) -> str:
    """:meth:`~icl_lens.study.runs.ComparisonSet.table` as text: per FT mode and metric
    the value and its hierarchical interval, then the baselines' values."""
    lines = [title]
    notes: list[str] = []
    for mode, f in table.groupby("ft_mode", sort=False):
        if table["ft_mode"].nunique() > 1:
            lines.append(f"FT {mode}")
        obs = f[f["baseline"] == "none"]
        others = [b for b in dict.fromkeys(f["baseline"]) if b != "none"]
        by = f.set_index(["metric", "variant", "baseline"])["value"]
        header = _header(others)
        rows = []
        for (_, row), mark in zip(obs.iterrows(), _notes(obs["flag"], notes), strict=True):
            cells = [
                row["metric"],
                row["variant"],
                _num(row["value"]),
                _num(row["ci_low"]),
                _num(row["ci_high"]),
            ]
            for b in others:
                key = (row["metric"], row["variant"], b)
                cells.append(_num(by[key]) if key in by.index else "")
            rows.append([*cells, mark])
        lines.append(_render(rows, header, left=2))
    lines += [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)
