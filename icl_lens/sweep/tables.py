"""A sweep's tables: ``summary.parquet`` (every cell's rows) and ``aggregate.parquet``
(the mean over demonstration sets and orders).

``summary``: tidy, one row per cell x metric x variant x baseline x layer x head: the
columns of :data:`icl_lens.analyses.FRAME_COLUMNS`, a ``cell`` id and one column per grid
key. Accuracies are rows too (``metric == "accuracy"``, ``variant`` zsl / icl / ft,
``baseline`` none or untrained_weights), so one table holds everything a paper table
shows.

``aggregate``: per combination of the grid keys other than ``seed`` / ``order_seed``, and
per metric row, the ``mean``, ``std``, ``min``, ``max`` and ``n`` over the cells that
differ only in those seeds (:func:`icl_lens.analyses.aggregate_runs`), and an interval
``ci_low`` / ``ci_high`` (:func:`seed_intervals`).

>>> frame = summary_frame(root, grid.cells)                   # doctest: +SKIP
>>> aggregate_frame(root, frame, list(grid.grid)).head()      # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.analyses import FRAME_COLUMNS, aggregate_runs
from icl_lens.files import atomic_write_bytes
from icl_lens.study.comparison import ACCURACY, Comparison
from icl_lens.sweep.grid import SEED_KEYS, Cell

__all__ = [
    "ACCURACY",
    "ROW_KEYS",
    "aggregate_frame",
    "seed_intervals",
    "summary_frame",
    "write_tables",
]

ROW_KEYS = ["metric", "variant", "baseline", "layer", "head"]


def _label(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def summary_frame(root: str | Path, cells: Sequence[Cell]) -> pd.DataFrame:
    """Every finished cell's rows (cells without ``results.json`` are left out)."""
    keys = list(cells[0].grid) if cells else []
    parts = []
    for cell in cells:
        path = Path(root) / "cells" / cell.name / "results.json"
        if not path.exists():
            continue
        labels = {"cell": cell.id, **{k: _label(cell.grid[k]) for k in keys}}
        parts.append(Comparison.from_json(path).labelled_frame(labels))
    if not parts:
        return pd.DataFrame(columns=["cell", *keys, *FRAME_COLUMNS])
    summary = pd.concat(parts, ignore_index=True)
    for key in keys:  # one type per column (Parquet): mixed values become text
        if summary[key].map(type).nunique() > 1:
            summary[key] = summary[key].astype(str)
    return summary


def seed_intervals(
    root: str | Path, summary: pd.DataFrame, by: list[str], over: list[str]
) -> pd.DataFrame:
    """The interval of every aggregate row: ``by`` columns, then ``ci_low``, ``ci_high``.

    PENDING (issue 13): the interval is to be the hierarchical bootstrap over
    demonstration sets and orders, then queries, written by the rigor work
    (``icl_lens.analyses.hierarchical_table(runs)``, ``runs`` = ``{(seed, order_seed, ...):
    per-query values}`` of one metric row). Until it lands on main the interval is NaN:
    the sweep computes no bootstrap of its own. Wiring it needs each cell's per-query
    values on disk (a ``Comparison`` keeps them in memory only), e.g. written by
    ``icl-lens run`` next to results.json and read here from ``root/cells/*``.
    """
    out = summary[by].drop_duplicates().reset_index(drop=True)
    out["ci_low"] = np.nan
    out["ci_high"] = np.nan
    return out


def aggregate_frame(root: str | Path, summary: pd.DataFrame, grid_keys: Sequence[str]):
    """Mean, std, min, max, n and interval over seeds / orders, per combination of the
    other grid keys and per metric row."""
    keys = [k for k in grid_keys if k not in SEED_KEYS]
    over = [k for k in grid_keys if k in SEED_KEYS] or ["cell"]
    by = [*keys, *ROW_KEYS]
    columns = [*by, "mean", "std", "min", "max", "n", "ci_low", "ci_high"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    agg = aggregate_runs(summary, over=over, by=by)
    agg = agg.merge(seed_intervals(root, summary, by, over), on=by, how="left")
    return agg[columns]


def _write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return atomic_write_bytes(path, buffer.getvalue())


def write_tables(root: str | Path, cells: Sequence[Cell]) -> tuple[Path, Path]:
    """Write ``root/summary.parquet`` and ``root/aggregate.parquet``."""
    root = Path(root)
    summary = summary_frame(root, cells)
    keys = list(cells[0].grid) if cells else []
    aggregate = aggregate_frame(root, summary, keys)
    return (
        _write_parquet(summary, root / "summary.parquet"),
        _write_parquet(aggregate, root / "aggregate.parquet"),
    )
