"""What a momentum study writes and prints: the summary over seeds (with the paired
difference to vanilla), ``results.json``, ``summary.csv``, ``momentum.svg`` and the
text / Markdown tables.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icl_lens.momentum_study.config import GROUPS, StudyConfig, run_metrics
from icl_lens.momentum_study.figure import momentum_figure
from icl_lens.views.figures import save_svg

__all__ = ["format_table", "markdown_table", "summarise", "write_outputs"]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per variant and metric: n, mean, std (sample, ddof 1; None for one seed), min, max
    over seeds; and the
    paired difference to ``vanilla`` on the same seeds (``diff_vs_vanilla``), if present.

    >>> runs = [{"variant": v, "seed": s, "val_ppl": p, "val_loss": 0.0,
    ...          "val_label_loss": 0.0, "icl": {g: {"0": 50.0} for g in GROUPS}}
    ...         for v, s, p in [("vanilla", 0, 3.0), ("vanilla", 1, 5.0),
    ...                         ("eta0.5", 0, 2.0), ("eta0.5", 1, 5.0)]]
    >>> out = summarise(runs, StudyConfig(variants=("vanilla", "eta0.5"), shots=(0,)))
    >>> out["eta0.5"]["val_ppl"]["mean"], out["eta0.5"]["diff_vs_vanilla"]["val_ppl"]["mean"]
    (3.5, -0.5)
    """
    by_variant: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], {})[run["seed"]] = run_metrics(run, config.shots)
    base = by_variant.get("vanilla", {})
    summary: dict[str, Any] = {}
    for variant in [v for v in config.variants if v in by_variant]:
        per_seed = by_variant[variant]
        names = list(next(iter(per_seed.values())))
        entry: dict[str, Any] = {"seeds": sorted(per_seed)}
        for name in names:
            entry[name] = _stats([m[name] for m in per_seed.values()])
        if variant != "vanilla" and base:
            common = sorted(set(per_seed) & set(base))
            entry["diff_vs_vanilla"] = {
                name: _stats([per_seed[s][name] - base[s][name] for s in common])
                for name in names
                if common and name in base[common[0]]
            }
        summary[variant] = entry
    return summary


CSV_FIELDS = ("variant", "metric", "n", "mean", "std", "min", "max", "diff_mean", "diff_std")


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> None:
    """``results.json``, ``summary.csv`` (one row per variant and metric; ``diff_*`` is the
    paired difference to vanilla) and ``momentum.svg`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for variant, entry in results["summary"].items():
            diffs = entry.get("diff_vs_vanilla", {})
            for metric, st in entry.items():
                if metric in ("seeds", "diff_vs_vanilla"):
                    continue
                d = diffs.get(metric, {})
                writer.writerow(
                    [variant, metric, st["n"]]
                    + [_fmt(st[x]) for x in ("mean", "std", "min", "max")]
                    + [_fmt(d.get("mean")), _fmt(d.get("std"))]
                )
    config = StudyConfig.from_dict(results["config"])
    save_svg(momentum_figure(results["runs"], config), out / "momentum.svg")


def _fmt(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_table(results: dict[str, Any]) -> str:
    """Mean ± std (over seeds) per variant: perplexity and ICL accuracy per group and k."""
    config = StudyConfig.from_dict(results["config"])
    cols = ["val_ppl"] + [f"icl_{g}_k{k}" for g in GROUPS for k in config.shots]
    heads = ["ppl"] + [f"{g[:4]} k={k}" for g in GROUPS for k in config.shots]
    widths = [max(13, len(h)) for h in heads]
    lines = ["variant   n " + " ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for variant, entry in results["summary"].items():
        cells = []
        for col, w in zip(cols, widths, strict=True):
            st = entry[col]
            prec = 3 if col == "val_ppl" else 1
            std = "-" if st["std"] is None else f"{st['std']:.{prec}f}"
            cells.append(f"{st['mean']:.{prec}f}±{std}".rjust(w))
        lines.append(f"{variant:8s} {len(entry['seeds']):2d} " + " ".join(cells))
    return "\n".join(lines)


def markdown_table(results: dict[str, Any], groups: Sequence[str] = GROUPS) -> str:
    """A Markdown table: per variant, mean ± std [min, max] over seeds of the perplexity and
    of the ICL accuracy (%) per group and k; then the paired difference to vanilla."""
    config = StudyConfig.from_dict(results["config"])
    cols = [("val_ppl", "val ppl", 2)]
    cols += [(f"icl_{g}_k{k}", f"{g} k={k}", 1) for g in groups for k in config.shots]

    def cell(st: dict[str, Any], prec: int, spread: bool = True) -> str:
        std = "n/a" if st["std"] is None else f"{st['std']:.{prec}f}"
        text = f"{st['mean']:.{prec}f} ± {std}"
        return text + (f" [{st['min']:.{prec}f}, {st['max']:.{prec}f}]" if spread else "")

    head = "| variant | seeds | " + " | ".join(name for _, name, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for variant, entry in results["summary"].items():
        cells = [cell(entry[c], p) for c, _, p in cols]
        lines.append(f"| {variant} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    diffs = [
        (v, e["diff_vs_vanilla"]) for v, e in results["summary"].items() if "diff_vs_vanilla" in e
    ]
    if diffs:
        lines += ["", "Paired difference to vanilla (same seed), mean ± std [min, max]:", ""]
        lines += [head.replace("| seeds |", "| pairs |"), "|" + "---|" * (len(cols) + 2)]
        for variant, d in diffs:
            cells = [cell(d[c], p) for c, _, p in cols]
            n = d[cols[0][0]]["n"]
            lines.append(f"| {variant} − vanilla | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
