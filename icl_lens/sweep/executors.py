"""Where a sweep's workers run: submitit's executors and the grid file's [slurm] / [local]
tables, checked before anything is submitted.

``debug`` runs the workers in the calling process (submitit's DebugExecutor), ``local``
in subprocesses on this machine (its LocalExecutor, with the [local] table), ``slurm``
as a job array (its AutoExecutor on SLURM, with the [slurm] table: the generic names
timeout_min, mem_gb, gpus_per_node, cpus_per_task, name, and SLURM's own).

A table's values are checked here, not left to fail inside submitit: ``timeout_min =
"ten"`` is refused naming the key, and so is a timeout shorter than the signal delay
(submitit signals the worker ``signal_delay_s`` before the timeout so that it can
checkpoint and be requeued; a shorter timeout kills it unsignalled, and nothing is
requeued).

>>> executor_table("local", {"timeout_min": 60, "signal_delay_s": 30})
{'timeout_min': 60, 'signal_delay_s': 30}
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icl_lens.sweep.grid import Grid, GridError

__all__ = [
    "EXECUTORS",
    "LOCAL_TIMEOUT_MIN",
    "SIGNAL_DELAY_S",
    "SLURM_TIMEOUT_MIN",
    "executor_table",
    "make_executor",
    "require_executor",
    "timeout_note",
]

EXECUTORS = ("debug", "local", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
"""submitit's LocalExecutor times a job out after 2 minutes unless told otherwise."""
SLURM_TIMEOUT_MIN = 5
"""submitit asks SLURM for 5 minutes a job unless [slurm] timeout_min says otherwise."""
SIGNAL_DELAY_S = {"local": 30, "slurm": 90}
"""submitit's defaults: how long before the timeout the worker is signalled."""
SLURM_GENERIC = ("timeout_min", "mem_gb", "gpus_per_node", "cpus_per_task", "name")
LOCAL_KEYS = ("timeout_min", "signal_delay_s", "gpus_per_node", "visible_gpus", "max_num_timeout")
ONE_TASK = ("nodes", "tasks_per_node", "ntasks_per_node")
NUMBERS = {  # key: (what it takes, smallest value, integers only)
    "timeout_min": ("minutes", 0, False),
    "signal_delay_s": ("seconds", 0, True),
    "gpus_per_node": ("a count", 0, True),
    "cpus_per_task": ("a count", 1, True),
    "mem_gb": ("gigabytes", 0, False),
    "max_num_timeout": ("a count", 0, True),
}


def _number(name: str, key: str, value: Any) -> None:
    what, low, integer = NUMBERS[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
        kind = "an integer" if integer else "a number"
        raise GridError(
            f"{name}.{key} = {value!r}: {kind} of {what} >= {low}"
            + (f", e.g. {key} = 60" if key == "timeout_min" else "")
        )


def executor_table(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """The [slurm] / [local] table, its keys checked against what submitit takes and its
    numbers checked as numbers."""
    if name == "local" or not table:
        known = set(LOCAL_KEYS)
    else:
        import submitit

        known = (
            set(SLURM_GENERIC) | submitit.SlurmExecutor._valid_parameters() | {"max_num_timeout"}
        )
    out = {}
    for key, value in table.items():
        bare = key.removeprefix(f"{name}_")
        if bare in ONE_TASK and value != 1:
            raise GridError(
                f"{name}.{key}: a sweep worker is one task on one node; use --max-parallel "
                "to run cells side by side"
            )
        if bare not in known:
            raise GridError(f"{name}.{key}: submitit does not know it; choose from {sorted(known)}")
        if bare in NUMBERS:
            _number(name, key, value)
        if bare == "visible_gpus" and not (
            isinstance(value, list) and all(isinstance(v, int) for v in value)
        ):
            raise GridError(f"{name}.{key} = {value!r}: a list of GPU indices, e.g. [0, 1]")
        out[bare] = value
    _check_signal_delay(name, out)
    return out


def _check_signal_delay(name: str, table: Mapping[str, Any]) -> None:
    if "timeout_min" not in table:
        return
    delay = table.get("signal_delay_s", SIGNAL_DELAY_S[name])
    if table["timeout_min"] * 60 <= delay:
        raise GridError(
            f"{name}.timeout_min = {table['timeout_min']} ({table['timeout_min'] * 60:g} s) "
            f"is not longer than the signal delay ({name}.signal_delay_s = {delay}): submitit "
            "would kill the worker before signalling it to checkpoint, and requeue nothing; "
            "give a longer timeout_min or a shorter signal_delay_s"
        )


def timeout_note(kind: str, grid: Grid) -> str:
    """What a job killed at its time limit should say: the limit and the keys to change."""
    table = grid.local if kind == "local" else grid.slurm
    key = "time" if "time" in table and kind == "slurm" else "timeout_min"
    minutes = table.get(key, LOCAL_TIMEOUT_MIN if kind == "local" else None)
    limit = f"{kind}.{key} = {minutes}"
    if minutes is None:
        limit = f"{SLURM_TIMEOUT_MIN} minutes (submitit's default: slurm.timeout_min is unset)"
    retries = table.get("max_num_timeout", 3)
    return (
        f"the job reached {limit} (requeued at most {kind}.max_num_timeout = {retries} "
        f"times); raise {kind}.timeout_min or max_num_timeout and run the same command "
        "again: the cell resumes from its checkpoints"
    )


def require_executor(kind: str) -> None:
    """Refuse an executor this machine cannot use, before anything is written."""
    if kind not in EXECUTORS:
        raise GridError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if kind == "slurm" and missing:
        raise GridError(
            f"--executor slurm: {' and '.join(missing)} not found on this machine's PATH "
            "(no SLURM here); run the command on the cluster's login node, or use "
            "--executor local"
        )


def make_executor(kind: str, folder: Path, grid: Grid, max_parallel: int | None):
    """A submitit executor of ``kind`` writing its logs under ``folder``."""
    import submitit

    require_executor(kind)
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    table = dict(grid.local if kind == "local" else grid.slurm)
    retries = table.pop("max_num_timeout", 3)
    params: dict[str, Any] = {"name": "icl-lens-sweep", "stderr_to_stdout": True}
    if kind == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=retries)
        params |= {"timeout_min": LOCAL_TIMEOUT_MIN, **_local_gpus(), **table}
    else:
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=retries)
        params["slurm_stderr_to_stdout"] = params.pop("stderr_to_stdout")
        for key, value in table.items():
            params[key if key in SLURM_GENERIC else f"slurm_{key}"] = value
        if max_parallel:
            params["slurm_array_parallelism"] = max_parallel
    executor.update_parameters(**params)
    return executor


def _local_gpus() -> dict[str, Any]:
    """Local workers see the GPUs this process sees: submitit's LocalExecutor sets
    ``CUDA_VISIBLE_DEVICES`` to its first ``gpus_per_node`` devices (none by default)."""
    import torch

    n = torch.cuda.device_count()
    if not n:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(x) for x in visible.split(",") if x.strip().isdigit()]
    out: dict[str, Any] = {"gpus_per_node": n}
    if len(ids) == n:
        out["visible_gpus"] = tuple(ids)
    return out
