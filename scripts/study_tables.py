"""docs/real-models.md's study tables from a sweep, and the checks of its reading.

    python scripts/study_tables.py runs/gemma3-study                  # print the tables
    python scripts/study_tables.py runs/gemma3-study --write docs/real-models.md
    python scripts/study_tables.py --check docs/real-models.md        # CI: tests/test_docs_study.py

``--write`` stores the numbers the tables show (means over demonstration sets with their
spread, interval, flag and baselines, per task and protocol; per set: accuracy, the chosen
learning rate, the run's flags, demonstration tokens, Rec2FTP's queries) in
docs/real-models-numbers.json and rewrites the doc's table block from them. ``--check``
renders the tables from that file again and verifies the doc: its block must be what they
render, every ``<!-- check: QUOTE = EXPRESSION -->`` must hold (QUOTE as the text writes
it; EXPRESSION over the numbers, rounded to QUOTE's decimals), and every number in the
reading below the tables must be checked or listed in a ``<!-- given: ... -->`` (settings,
not results). Reads the cells' results.json and values.npz through icl_lens.sweep.tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from doc_checks import HELPERS, check_doc, write_doc

from icl_lens.sweep.grid import Cell
from icl_lens.sweep.status import cell_directory, is_done
from icl_lens.sweep.tables import aggregate_frame, summary_frame

BEGIN = "<!-- study tables: python scripts/study_tables.py runs/gemma3-study -->"
END = "<!-- end of study tables -->"
OVERALL_COLUMNS = [
    "task", "protocol", "metric", "variant", "baseline",
    "mean", "std", "min", "max", "n", "ci_low", "ci_high", "n_sets", "flag", "eligible",
]  # fmt: skip

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


def numbers(root: Path) -> dict[str, Any]:
    """What the tables and the reading quote, from the sweep's done cells: ``overall``
    (one row per task, protocol, metric, variant, baseline; over sets) and ``cells`` (one
    per demonstration set: accuracy, chosen learning rate, flags, tokens, Rec2FTP counts)."""
    grid = json.loads((root / "sweep.json").read_text())
    cells = [Cell.from_dict(c) for c in grid["cells"]]
    summary = summary_frame(root, cells)
    aggregate = aggregate_frame(root, summary, list(cells[0].grid))
    overall = aggregate[(aggregate["layer"] == -1) & (aggregate["head"] == -1)].copy()
    # Rec2FTP rests on the queries ZSL gets wrong and FT right: say how many, per set
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
    overall = overall[OVERALL_COLUMNS].astype(object).where(overall[OVERALL_COLUMNS].notna(), None)
    per_set = []
    for cell in cells:
        if not is_done(cell_directory(root, cell)):
            continue
        result = json.loads((cell_directory(root, cell) / "results.json").read_text())
        info, config = result["info"], result["config"]
        per_set.append(
            {
                **{k: cell.grid[k] for k in cell.grid},
                "accuracy": result["accuracy"],
                "lr": result["lr"]["selected"],
                "lr_grid": [row["lr"] for row in result["lr"]["grid"]],
                "flags": result["flags"],
                "k": info["k_effective"],
                "demonstration_tokens": info["demonstration_tokens"],
                "n_queries": info["n_queries"],
                "rec2ftp_counts": info.get("rec2ftp_counts"),
                "untrained_accuracy": result["control"]["accuracy"],
                "lr_grid_asked": config["lr_grid"],
            }
        )
    return {"overall": overall.to_dict("records"), "cells": per_set}


def overall_frame(data: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(data["overall"], columns=OVERALL_COLUMNS)
    for column in ("mean", "std", "min", "max", "ci_low", "ci_high"):
        frame[column] = frame[column].astype(float)
    frame["eligible"] = frame["eligible"].fillna("")
    frame["flag"] = frame["flag"].fillna("")  # None in the file: no flag
    return frame


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
        "| metric | protocol | value ± sd over sets [95% CI] | "
        + " | ".join(c for _, c in COLUMNS)
        + " | flag |",
        "|---" * (4 + len(COLUMNS)) + "|",
    ]
    flags: list[str] = []  # each distinct flag once, under the table, by number
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
                value += f" (queries per set: {obs['eligible']})"
            rest = []
            for baseline, _ in COLUMNS:
                if metric == "rec2ftp" and baseline == "shuffled_queries":
                    baseline = "independent"
                r = _row(sub, metric, variant, baseline)
                rest.append(_fmt(r["mean"]) if r is not None else "")
            flag = obs["flag"] or ""
            if flag and flag not in flags:
                flags.append(flag)
            mark = f"[{flags.index(flag) + 1}]" if flag else ""
            lines.append(f"| {label} | {p} | {value} | " + " | ".join(rest) + f" | {mark} |")
    if flags:
        lines += ["", *(f"[{i}] {flag}  " for i, flag in enumerate(flags, 1))]
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


def render(data: dict[str, Any]) -> str:
    """The tables (markdown) of :func:`numbers`' output."""
    frame = overall_frame(data)
    protocols = [p for p in ("prediction", "dai2023") if p in set(frame["protocol"])]
    tasks = [t for t in PAPER_ACCURACY if t in set(frame["task"])]
    tables = [task_table(frame[frame["task"] == t], t, protocols) for t in tasks]
    return "\n\n".join([*tables, average_table(frame, protocols)])


def write(root: Path, doc: Path) -> None:
    """Store the sweep's numbers beside ``doc`` and rewrite its table block from them."""
    write_doc(doc, numbers(root), render, BEGIN, END)


def check(doc: Path) -> list[str]:
    """What in ``doc`` its numbers file does not bear out (empty: all of it)."""
    return check_doc(doc, render, namespace, BEGIN, END)


# ---- the checks of the reading (scripts/doc_checks.py) --------------------------------


def namespace(data: dict[str, Any]) -> dict[str, Any]:
    """What a check's expression may use: ``v(task, protocol, metric, variant,
    baseline="none", stat="mean")``, ``tasks(protocol, metric, variant, baseline="none",
    stat="mean")`` (one value per task), ``sets(**where)`` (the per-set records),
    ``paper(task)`` / ``paper(metric, variant)`` (the paper's numbers), ``icl(task)`` and
    ``recovered(task)`` (each set's ICL accuracy, Rec2FTP queries), ``lower(task, metric,
    variant)`` (dai2023 below prediction), ``TASKS``, ``pct``, ``mean`` and Python's min,
    max, sum, len, sorted, abs, round."""
    frame = overall_frame(data)

    def rows(**where: str) -> pd.DataFrame:
        hit = frame
        for key, value in where.items():
            hit = hit[hit[key] == value]
        return hit

    def v(task, protocol, metric, variant, baseline="none", stat="mean"):
        hit = rows(task=task, protocol=protocol, metric=metric, variant=variant, baseline=baseline)
        if len(hit) != 1:
            raise KeyError(f"{len(hit)} rows for {task}/{protocol}/{metric}/{variant}/{baseline}")
        return hit.iloc[0][stat]

    def tasks(protocol, metric, variant, baseline="none", stat="mean"):
        hit = rows(protocol=protocol, metric=metric, variant=variant, baseline=baseline)
        return [x for x in hit[stat] if x is not None and not pd.isna(x)]

    def sets(**where):
        return [c for c in data["cells"] if all(c[k] == x for k, x in where.items())]

    def paper(task_or_metric, variant=None):
        """The paper's numbers: a task's accuracies ((ZSL, ICL, FT) for GPT 1.3B, then
        2.7B) or a metric's average over its tasks (1.3B, 2.7B)."""
        if variant is None:
            return [[float(x) for x in m.split(" / ")] for m in PAPER_ACCURACY[task_or_metric]]
        return [float(x.strip("%")) for x in re.findall(r"[\d.]+%?", PAPER_AVERAGE[
            (task_or_metric, variant)])[:2]]  # fmt: skip

    def icl(task, protocol="prediction"):  # each set's ICL accuracy
        return [c["accuracy"]["icl"] for c in sets(task=task, protocol=protocol)]

    def recovered(task, protocol="prediction"):  # each set's Rec2FTP queries
        return [c["rec2ftp_counts"]["n_ft_recovered"] for c in sets(task=task, protocol=protocol)]

    def lower(task, metric, variant):  # dai2023 below the prediction protocol
        return v(task, "dai2023", metric, variant) < v(task, "prediction", metric, variant)

    return {"v": v, "tasks": tasks, "sets": sets, "paper": paper, "icl": icl,
            "recovered": recovered, "lower": lower, "TASKS": list(PAPER_ACCURACY),
            **HELPERS}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", type=Path, help="the sweep's output directory")
    parser.add_argument("--write", type=Path, metavar="DOC", help="rewrite DOC's tables")
    parser.add_argument("--check", type=Path, metavar="DOC", help="check DOC's reading")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.check)
        print("\n".join(problems) or f"{args.check}: every quoted number checks out")
        return 1 if problems else 0
    if args.root is None:
        parser.error("give the sweep's directory, or --check DOC")
    if args.write:
        write(args.root, args.write)
    else:
        print(render(numbers(args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
