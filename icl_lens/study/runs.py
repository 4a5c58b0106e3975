"""Several :func:`~icl_lens.study.compare.compare` runs: demonstration sets x orders.

:func:`compare_runs` runs one comparison per seed (demonstration set) and order seed,
sharing what does not depend on them (the ZSL recordings). :meth:`ComparisonSet.table`
is the headline: each overall value as the mean over demonstration sets (of the mean
over their orders, and over the control's draws), with an interval over sets and queries
(:func:`icl_lens.analyses.hierarchical_table`: a t interval over the sets' values plus
what the shared queries add), flagged like a single run's where it cannot speak, and
where one set leaves the interval blind to other sets.

>>> runs = compare_runs(model, "sst2", seeds=(1, 2), orders=(None, 0))  # doctest: +SKIP
>>> runs.table()                                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from icl_lens import analyses
from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Task
from icl_lens.study.compare import compare
from icl_lens.study.comparison import Comparison

__all__ = ["ComparisonSet", "compare_runs"]


@dataclass
class ComparisonSet:
    """Several :func:`compare` runs (seeds x demonstration orders) and their spread."""

    runs: dict[tuple[int, int | None], Comparison]

    def metrics(self) -> pd.DataFrame:
        """Every run's tidy frame with ``seed`` and ``order`` columns."""
        parts = [
            c.metrics().assign(seed=s, order=-1 if o is None else o)
            for (s, o), c in self.runs.items()
        ]
        return pd.concat(parts, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Mean, std, min, max and n of every metric row over the runs."""
        return analyses.aggregate_runs(self.metrics(), over=["seed", "order"])

    def accuracy(self) -> pd.DataFrame:
        rows = [{"seed": s, "order": o, **c.accuracy} for (s, o), c in self.runs.items()]
        return pd.DataFrame(rows)

    def table(
        self, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> pd.DataFrame:
        """The overall rows over all runs: ``metric, variant, baseline, ft_mode, value,
        ci_low, ci_high, n_runs, n_sets, n_queries, flag``. ``value``: the mean over
        demonstration sets of the mean over their orders (and over the control's draws);
        the interval: :func:`~icl_lens.analyses.hierarchical_table` (sets, then queries);
        ``n_sets``: sets with a defined value. ``flag``: a Rec2FTP flagged in every run,
        an interval from one set or too few queries
        (:func:`~icl_lens.analyses.interval_flags`), an interval overlapping a shuffled
        pairing's (or Rec2FTP's independent baseline's)."""
        first = next(iter(self.runs.values()))
        if not first.values:
            raise ValueError(
                "these runs hold no per-query values (loaded from JSON?): rerun compare_runs"
            )
        rows = []
        for key in first.values:
            metric, variant, baseline, mode = key
            runs = {
                (s, -1 if o is None else o, *sub): x
                for (s, o), c in self.runs.items()
                for sub, x in c.values.get(key, {}).items()
            }
            table = analyses.hierarchical_table(
                runs,
                seed=seed,
                n_resamples=n_resamples,
                confidence=confidence,
                bounds=analyses.VALUE_RANGES.get(metric),
            )
            overall = table.iloc[0]
            rows.append(
                {
                    "metric": metric,
                    "variant": variant,
                    "baseline": baseline,
                    "ft_mode": mode,
                    "layer": analyses.ALL,
                    "head": analyses.ALL,
                    "value": overall["value"],
                    "ci_low": overall["ci_low"],
                    "ci_high": overall["ci_high"],
                    "n_runs": len(self.runs),
                    "n_sets": int(overall["n_outer"]),
                    "n_queries": int(overall["n_queries"]),
                }
            )
        frame = pd.DataFrame(rows)
        own = pd.Series([None] * len(frame), index=frame.index, dtype=object)
        for i, row in frame.iterrows():
            if row["metric"] == "rec2ftp" and row["baseline"] == analyses.OBSERVED:
                notes = {_run_flag(c, row["ft_mode"]) for c in self.runs.values()}
                if len(notes) == 1 and None not in notes:
                    own[i] = notes.pop()
        frame["flag"] = analyses.join_flags(
            own, analyses.interval_flags(frame), analyses.indistinguishable(frame)
        )
        return frame.drop(columns=["layer", "head"])


def _run_flag(c: Comparison, mode: str) -> str | None:
    f = c.frame
    rows = f[
        (f["metric"] == "rec2ftp")
        & (f["baseline"] == analyses.OBSERVED)
        & (f["layer"] == analyses.ALL)
        & (f["ft_mode"] == mode)
    ]
    note = rows["flag"].iloc[0] if len(rows) else None
    return (
        note.split("; ")[0]
        if isinstance(note, str) and note.startswith(("unin", "undef"))
        else None
    )


def compare_runs(
    model,
    task: Task | str | os.PathLike,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    orders: Sequence[int | None] = (None,),
    checkpoint_dir: str | os.PathLike | None = None,
    **kwargs,
) -> ComparisonSet:
    """:func:`compare` for every seed (demonstration set) and order seed (demonstration
    order of the same set; ``None`` keeps the shuffled order), aggregated.

    >>> runs = compare_runs(model, "sst2", seeds=(1, 2), orders=(None, 0))  # doctest: +SKIP
    >>> runs.table().query("baseline == 'none'")                            # doctest: +SKIP
    """
    if not isinstance(task, Task):
        task = load_task(task)
    shared: dict = {}
    runs = {}
    for s in seeds:
        for o in orders:
            sub = None
            if checkpoint_dir is not None:
                sub = (
                    Path(checkpoint_dir)
                    / f"seed-{s}"
                    / ("order-none" if o is None else f"order-{o}")
                )
            runs[s, o] = compare(
                model, task, seed=s, order_seed=o, checkpoint_dir=sub, shared=shared, **kwargs
            )
    return ComparisonSet(runs)
