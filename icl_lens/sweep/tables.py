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
``ci_low`` / ``ci_high`` over demonstration sets, orders, then queries
(:func:`seed_intervals`, from each cell's ``values.npz``).

Both tables carry, in their Parquet metadata, the grid keys and the cells they were
built from (id, sizes and times of its ``results.json`` and ``values.npz``):
:func:`tables_current` tells whether they still match the sweep directory, and
:func:`current_tables` rebuilds them when not (``icl-lens report`` does, so its page
never shows a stale aggregate).

>>> frame = summary_frame(root, grid.cells)                   # doctest: +SKIP
>>> aggregate_frame(root, frame, list(grid.grid)).head()      # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.analyses import (
    FRAME_COLUMNS,
    VALUE_RANGES,
    aggregate_runs,
    hierarchical_table,
    indistinguishable,
    interval_flags,
    join_flags,
)
from icl_lens.files import atomic_write_bytes
from icl_lens.study.comparison import ACCURACY, Comparison
from icl_lens.sweep.grid import SEED_KEYS, Cell
from icl_lens.sweep.status import cell_directory, is_done
from icl_lens.views.sweep_report import TABLE_CELLS_KEY, read_sweep, table_cells

__all__ = [
    "ACCURACY",
    "ROW_KEYS",
    "aggregate_frame",
    "cells_stamp",
    "current_tables",
    "seed_intervals",
    "summary_frame",
    "tables_current",
    "write_tables",
]

ROW_KEYS = ["metric", "variant", "baseline", "layer", "head", "ft_mode"]
"""What tells a cell's rows apart (``ft_mode``: with ``--ft-mode both`` each metric row
comes once per FT mode; NaN on the accuracy rows)."""


def _label(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def _done(root: str | Path, cells: Sequence[Cell]) -> list[Cell]:
    return [c for c in cells if is_done(cell_directory(root, c))]


def cells_stamp(root: str | Path, cells: Sequence[Cell]) -> dict[str, Any]:
    """What the tables of ``cells`` are built from: the grid keys, and each done cell's
    id with the sizes and times of its ``results.json`` and ``values.npz``."""
    done = []
    for cell in _done(root, cells):
        entry = [cell.id]
        for name in ("results.json", "values.npz"):  # values.npz: the intervals
            path = cell_directory(root, cell) / name
            entry += [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else [0, 0]
        done.append(entry)
    return {"keys": list(cells[0].grid) if cells else [], "cells": done}


def summary_frame(root: str | Path, cells: Sequence[Cell]) -> pd.DataFrame:
    """Every done cell's rows (status done and ``results.json`` there)."""
    keys = list(cells[0].grid) if cells else []
    parts = []
    for cell in _done(root, cells):
        path = cell_directory(root, cell) / "results.json"
        labels = {"cell": cell.id, **{k: _label(cell.grid[k]) for k in keys}}
        try:
            comparison = Comparison.from_json(path)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a readable icl-lens result ({err}); {RERUN}") from err
        parts.append(comparison.labelled_frame(labels))
    if not parts:
        return pd.DataFrame(columns=["cell", *keys, *FRAME_COLUMNS])
    summary = pd.concat(parts, ignore_index=True)
    for key in keys:  # one type per column (Parquet): mixed values become text
        if summary[key].map(type).nunique() > 1:
            summary[key] = summary[key].astype(str)
    return summary


RERUN = (
    "delete that cell's results.json and run the same sweep command again (it reruns "
    "from its checkpoints)"
)


def _cell_values(root: Path, cell_id: str) -> dict | None:
    """A cell's per-query values (``values.npz`` written by ``icl-lens run``), or None."""
    found = sorted((root / "cells").glob(f"*-{cell_id}/values.npz"))
    if not found:
        return None
    try:
        return Comparison.load_values(found[0])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise ValueError(f"{found[0]} is not readable per-query values ({err}); {RERUN}") from err


def seed_intervals(
    root: str | Path, summary: pd.DataFrame, by: list[str], over: list[str]
) -> pd.DataFrame:
    """The interval of every aggregate row: ``by`` columns, then ``ci_low``, ``ci_high``.

    The hierarchical bootstrap of :func:`icl_lens.analyses.hierarchical_table`: over the
    cells that differ only in ``over`` (demonstration sets ``seed``, then their orders
    ``order_seed``; the untrained control's draws within a cell), then the queries, from
    each cell's ``values.npz``. Overall and per-layer rows get one; per-head rows, the
    accuracy rows and cells without ``values.npz`` (a run before icl-lens wrote it) stay
    NaN.
    """
    root = Path(root)
    out = summary[by].drop_duplicates().reset_index(drop=True)
    keys = [c for c in by if c not in ROW_KEYS]
    cells = summary.drop_duplicates("cell")[["cell", *keys, *over]]
    found = []
    groups = cells.groupby(keys, dropna=False, sort=False) if keys else [((), cells)]
    for combo, members in groups:
        combo = combo if isinstance(combo, tuple) else (combo,)
        runs: dict[tuple, dict[tuple, np.ndarray]] = {}
        for _, member in members.iterrows():
            values = _cell_values(root, member["cell"])
            if values is None:
                continue
            labels = tuple(member[c] for c in over) if over != ["cell"] else (member["cell"],)
            for row, subs in values.items():
                for sub, x in subs.items():
                    runs.setdefault(row, {})[(*labels, *sub)] = x
        for (metric, variant, baseline, mode), row_runs in runs.items():
            table = hierarchical_table(row_runs, bounds=VALUE_RANGES.get(metric))
            table = table[table["head"] == -1]  # values.npz keeps heads averaged
            for _, t in table.iterrows():
                found.append(
                    {
                        **dict(zip(keys, combo, strict=True)),
                        "metric": metric,
                        "variant": variant,
                        "baseline": baseline,
                        "layer": int(t["layer"]),
                        "head": int(t["head"]),
                        "ft_mode": mode,
                        "ci_low": t["ci_low"],
                        "ci_high": t["ci_high"],
                        "n_sets": int(t["n_outer"]),
                        "n_queries": int(t["n_queries"]),
                    }
                )
    if not found:
        out["ci_low"] = np.nan
        out["ci_high"] = np.nan
        out["n_sets"] = 0
        out["n_queries"] = 0
        return out
    intervals = pd.DataFrame(found)
    for col in keys:  # the summary's types (text for mixed values)
        intervals[col] = intervals[col].astype(out[col].dtype)
    return out.merge(intervals, on=by, how="left")


def aggregate_frame(root: str | Path, summary: pd.DataFrame, grid_keys: Sequence[str]):
    """Mean, std, min, max, n and interval over seeds / orders, per combination of the
    other grid keys and per metric row."""
    keys = [k for k in grid_keys if k not in SEED_KEYS]
    over = [k for k in grid_keys if k in SEED_KEYS] or ["cell"]
    by = [*keys, *ROW_KEYS]
    columns = [*by, "mean", "std", "min", "max", "n", "ci_low", "ci_high", "n_sets", "flag"]
    if summary.empty:
        return pd.DataFrame(columns=columns)
    agg = aggregate_runs(summary, over=over, by=by)
    agg = agg.merge(seed_intervals(root, summary, by, over), on=by, how="left")
    # as a single run's table and ComparisonSet.table(): an interval that cannot hold
    # (one set, few queries) or that overlaps a shuffled pairing's is said so
    agg["flag"] = join_flags(interval_flags(agg), indistinguishable(agg, by=[*keys, "ft_mode"]))
    return agg[columns]


def _write_parquet(frame: pd.DataFrame, path: Path, stamp: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {**(table.schema.metadata or {}), TABLE_CELLS_KEY: json.dumps(stamp).encode()}
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def write_tables(root: str | Path, cells: Sequence[Cell]) -> tuple[Path, Path]:
    """Write ``root/summary.parquet`` and ``root/aggregate.parquet`` from the done cells."""
    root = Path(root)
    cells = list({c.id: c for c in cells}.values())  # a cell listed twice counts once
    stamp = cells_stamp(root, cells)
    summary = summary_frame(root, cells)
    aggregate = aggregate_frame(root, summary, stamp["keys"])
    return (
        _write_parquet(summary, root / "summary.parquet", stamp),
        _write_parquet(aggregate, root / "aggregate.parquet", stamp),
    )


def tables_current(root: str | Path, cells: Sequence[Cell]) -> bool:
    """Whether both tables were built from exactly the cells done now."""
    stamp = cells_stamp(root, cells)
    names = ("summary.parquet", "aggregate.parquet")
    return all(table_cells(Path(root) / name) == stamp for name in names)


def current_tables(root: str | Path) -> tuple[Path, Path]:
    """The sweep's tables, rebuilt from its cells unless they are current."""
    root = Path(root)
    cells = [Cell.from_dict(c) for c in read_sweep(root)["cells"]]
    if tables_current(root, cells):
        return root / "summary.parquet", root / "aggregate.parquet"
    return write_tables(root, cells)
