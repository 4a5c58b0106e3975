"""The momentum study's figure (``OUT/momentum.svg``, docs/momentum.svg), drawn with
matplotlib: one panel per metric, one column per variant, a dot per seed, the mean as a
bar and +-1 std over seeds as a whisker; chance (50%) dashed on accuracy panels.

>>> fig = momentum_figure([], StudyConfig())
>>> [ax.get_title() for ax in fig.axes][:2]
['validation perplexity (lower is better)', 'ICL accuracy %, all instances, k=0']
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from icl_lens.momentum_study.config import StudyConfig, run_metrics
from icl_lens.views.figures import STYLE, new_figure

__all__ = ["default_panels", "momentum_figure"]


def default_panels(config: StudyConfig) -> list[tuple[str, str]]:
    """``(metric, title)``: perplexity, overall ICL accuracy at each k, and the two
    instance kinds at the largest k."""
    panels = [("val_ppl", "validation perplexity (lower is better)")]
    panels += [(f"icl_overall_k{k}", f"ICL accuracy %, all instances, k={k}") for k in config.shots]
    k_max = max(config.shots)
    panels += [
        (f"icl_arbitrary_k{k_max}", f"ICL accuracy %, arbitrary pairs, k={k_max}"),
        (f"icl_canonical_k{k_max}", f"ICL accuracy %, canonical pairs, k={k_max}"),
    ]
    return panels


def momentum_figure(
    runs: list[dict[str, Any]],
    config: StudyConfig,
    panels: Sequence[tuple[str, str]] | None = None,
) -> Figure:
    """One panel per ``(metric, title)`` of ``panels`` (default :func:`default_panels`):
    per variant the seeds' values (dots), their mean (bar, printed under the variant)
    and +-1 standard deviation (whisker)."""
    panels = list(panels) if panels is not None else default_panels(config)
    values: dict[str, dict[str, list[float]]] = {m: {} for m, _ in panels}
    for run in runs:
        metrics = run_metrics(run, config.shots)
        for m, _ in panels:
            if m in metrics:
                values[m].setdefault(run["variant"], []).append(metrics[m])
    variants = list(config.variants)
    palette = ["#444444", *matplotlib.colormaps["tab10"].colors]
    fig, axes = new_figure(len(panels), panel=(3.6, 2.7), ncols=3)
    with matplotlib.rc_context(STYLE):
        for ax, (metric, title) in zip(axes, panels, strict=True):
            prec = 3 if metric == "val_ppl" else 1
            labels = []
            for j, variant in enumerate(variants):
                xs = values[metric].get(variant, [])
                labels.append(variant)
                if not xs:
                    continue
                color = palette[j % len(palette)]
                mean = statistics.fmean(xs)
                std = statistics.stdev(xs) if len(xs) > 1 else 0.0
                jitter = (np.arange(len(xs)) - (len(xs) - 1) / 2) * 0.08
                ax.scatter(j + jitter, xs, s=14, color=color, alpha=0.55, linewidths=0)
                ax.hlines(mean, j - 0.3, j + 0.3, color=color, lw=2.5)
                ax.vlines(j, mean - std, mean + std, color=color, lw=1.2)
                labels[-1] = f"{variant}\n{mean:.{prec}f}"
            if metric.startswith("icl_"):
                ax.axhline(50.0, color="#bbbbbb", lw=0.9, ls="--", zorder=0)
            ax.set_xticks(range(len(variants)), labels)
            ax.set_xlim(-0.6, len(variants) - 0.4)
            ax.set_title(title)
            ax.grid(axis="y", color="#eeeeee", lw=0.6)
            ax.set_axisbelow(True)
        seeds = sorted({r["seed"] for r in runs})
        fig.suptitle(
            "Momentum attention vs vanilla, trained from scratch on the toy corpus "
            f"({config.n_layer} layers, d_model {config.n_embd}, {config.steps} steps x "
            f"{config.batch_size})",
            fontsize=10,
            fontweight="bold",
        )
        fig.supxlabel(
            f"seeds {seeds}; dot = one seed, bar = mean, whisker = +-1 std over seeds, "
            "dashed = chance (50%); held-out instances; the mean is printed under each variant",
            fontsize=7,
            color="#555555",
        )
    return fig
