"""Markdown tables of a sweep (finished cells so far), as docs/real-models.md shows them.

    python scripts/study_tables.py runs/gemma3-study > tables.md

Per task: ZSL / ICL / FT accuracy (mean over seeds, with the untrained-weights control's)
and every metric with its spread over seeds, its 95% interval (hierarchical bootstrap:
seeds, then queries) and its baselines; then the mean over tasks next to the paper's
averages (docs/method.md). Reads the cells' results.json and values.npz through
icl_lens.sweep.tables; writes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from icl_lens.sweep.grid import SEED_KEYS, Cell
from icl_lens.sweep.tables import aggregate_frame, summary_frame

METRICS = [
    ("rec2ftp", "paper", "Rec2FTP"),
    ("simaou", "normalised", "SimAOU (paper: normalised)"),
    ("simaou", "unnormalised", "SimAOU unnormalised"),
    ("simam", "after", "SimAM after (ICL vs FT)"),
    ("simam", "before", "SimAM before (ICL vs ZSL)"),
    ("simam", "changes", "SimAM on changes"),
    ("kendall", "tau_b", "Kendall tau-b"),
    ("kendall", "example", "Kendall tau-b over demonstrations"),
    ("topk_recall", "token", "top-100 token recall"),
    ("topk_recall", "example", "top-5 example recall"),
]
COLUMNS = [
    ("shuffled_queries", "shuffled q."),
    ("random_uniform", "random"),
    ("untrained_weights", "untrained"),
    ("icl_retest", "ICL retest"),
    ("ft_retest", "FT retest"),
]
PAPER_AVERAGE = {  # docs/method.md: averages over six tasks, GPT 1.3B / 2.7B
    ("rec2ftp", "paper"): "85.56% / 89.39%",
    ("simaou", "normalised"): "0.186 / 0.225 (random 0.002 / -0.001)",
    ("simam", "after"): "0.442 / 0.434",
    ("simam", "before"): "0.338 / 0.355",
    ("kendall", "tau_b"): "0.193 / 0.214 (random ~0.000)",
}
PAPER_ACCURACY = {  # ZSL / ICL / FT, GPT 1.3B and 2.7B (the paper prints ZSL / FT / ICL)
    "sst2": ("70.5 / 92.7 / 73.9", "71.4 / 95.0 / 76.9"),
    "sst5": ("39.3 / 45.0 / 39.5", "35.9 / 46.5 / 39.1"),
    "mr": ("65.9 / 89.0 / 73.0", "60.9 / 91.3 / 80.0"),
    "subj": ("72.6 / 90.0 / 77.8", "75.2 / 90.3 / 86.1"),
    "agnews": ("46.3 / 79.2 / 65.3", "39.8 / 80.3 / 65.7"),
}


def _fmt(x: float, pct: bool = False) -> str:
    if pd.isna(x):
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def frames(root: Path) -> tuple[pd.DataFrame, list[str]]:
    grid = json.loads((root / "sweep.json").read_text())
    cells = [Cell.from_dict(c) for c in grid["cells"]]
    summary = summary_frame(root, cells)
    keys = list(cells[0].grid)
    aggregate = aggregate_frame(root, summary, keys)
    overall = aggregate[(aggregate["layer"] == -1) & (aggregate["head"] == -1)].copy()
    # Rec2FTP rests on the queries ZSL gets wrong and FT right: say how many, per seed
    eligible = summary[
        (summary["metric"] == "rec2ftp")
        & (summary["baseline"] == "none")
        & (summary["layer"] == -1)
    ]
    counts = eligible.groupby(["task", "protocol"])["n_queries"].apply(
        lambda n: ", ".join(str(int(x)) for x in n)
    )
    overall["eligible"] = [
        counts.get((t, p), "") if m == "rec2ftp" else ""
        for t, p, m in zip(overall["task"], overall["protocol"], overall["metric"], strict=True)
    ]
    return overall, [k for k in keys if k not in SEED_KEYS]


def _row(frame: pd.DataFrame, metric: str, variant: str, baseline: str) -> pd.Series | None:
    hit = frame[
        (frame["metric"] == metric)
        & (frame["variant"] == variant)
        & (frame["baseline"] == baseline)
    ]
    return None if hit.empty else hit.iloc[0]


def task_table(frame: pd.DataFrame, task: str, protocols: list[str]) -> str:
    lines = [f"### {task}", ""]
    head = "| | " + " | ".join(protocols) + " | paper GPT 1.3B / 2.7B |"
    lines += [head, "|---" * (len(protocols) + 2) + "|"]
    for baseline, name in (
        ("none", "accuracy ZSL / ICL / FT (%)"),
        ("untrained_weights", "untrained control"),
    ):
        cells = []
        for p in protocols:
            sub = frame[frame["protocol"] == p]
            vals = [_row(sub, "accuracy", v, baseline) for v in ("zsl", "icl", "ft")]
            text = " / ".join(_fmt(r["mean"], pct=True) if r is not None else "n/a" for r in vals)
            n = next((int(r["n"]) for r in vals if r is not None), 0)
            cells.append(f"{text} (n={n})" if baseline == "none" else text)
        paper = " ; ".join(PAPER_ACCURACY.get(task, ("", ""))) if baseline == "none" else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paper} |")
    lines += [
        "",
        "| metric | protocol | value ± sd over seeds [95% CI] | "
        + " | ".join(c for _, c in COLUMNS)
        + " |",
        "|---" * (3 + len(COLUMNS)) + "|",
    ]
    for metric, variant, label in METRICS:
        for p in protocols:
            sub = frame[frame["protocol"] == p]
            obs = _row(sub, metric, variant, "none")
            if obs is None:
                continue
            value = (
                f"{_fmt(obs['mean'])} ± {_fmt(obs['std'])} "
                f"[{_fmt(obs['ci_low'])}, {_fmt(obs['ci_high'])}]"
            )
            if obs["eligible"]:
                value += f" (queries per seed: {obs['eligible']})"
            rest = []
            for baseline, _ in COLUMNS:
                if metric == "rec2ftp" and baseline == "shuffled_queries":
                    baseline = "independent"
                r = _row(sub, metric, variant, baseline)
                rest.append(_fmt(r["mean"]) if r is not None else "")
            lines.append(f"| {label} | {p} | {value} | " + " | ".join(rest) + " |")
    return "\n".join(lines)


def average_table(frame: pd.DataFrame, protocols: list[str]) -> str:
    first = protocols[0]
    lines = ["### Mean over the tasks", ""]
    lines += [
        "| metric | "
        + " | ".join(protocols)
        + f" | shuffled q. ({first}) | untrained ({first}) | paper GPT 1.3B / 2.7B |",
        "|---" * (len(protocols) + 4) + "|",
    ]

    def mean_over_tasks(protocol: str, metric: str, variant: str, baseline: str) -> pd.Series:
        sub = frame[(frame["protocol"] == protocol) & (frame["metric"] == metric)]
        return sub[(sub["variant"] == variant) & (sub["baseline"] == baseline)]

    for metric, variant, label in METRICS:
        cells = []
        for p in protocols:
            obs = mean_over_tasks(p, metric, variant, "none")
            cells.append(f"{_fmt(obs['mean'].mean())} ({obs['task'].nunique()} tasks)")
        null = "independent" if metric == "rec2ftp" else "shuffled_queries"
        shuffled = mean_over_tasks(first, metric, variant, null)["mean"].mean()
        ctrl = mean_over_tasks(first, metric, variant, "untrained_weights")["mean"].mean()
        paper = PAPER_AVERAGE.get((metric, variant), "")
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_fmt(shuffled)} | {_fmt(ctrl)} | {paper} |"
        )
    return "\n".join(lines)


def main(root: str) -> None:
    frame, keys = frames(Path(root))
    protocols = [p for p in ("prediction", "dai2023") if p in set(frame["protocol"])]
    tasks = [t for t in PAPER_ACCURACY if t in set(frame["task"])]
    print("\n\n".join([task_table(frame[frame["task"] == t], t, protocols) for t in tasks]))
    print()
    print(average_table(frame, protocols))


if __name__ == "__main__":
    main(sys.argv[1])
