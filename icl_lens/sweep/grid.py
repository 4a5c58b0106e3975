"""A sweep's grid file: fixed ``icl-lens run`` settings, the axes that vary, and where to
run; every combination of the axes is one cell, checked before anything is submitted.

    [run]            # fixed settings, the names of `icl-lens run` options
    task = "sst2"
    lr_grid = "short"
    control = true   # a `--no-X` flag may be given as `X = true/false`

    [grid]           # every combination is one cell
    model = ["models/a", "models/b"]
    seed = [1, 2, 3]

    [slurm]          # passed to submitit (partition, gpus_per_node, timeout_min, ...)
    [local]          # passed to submitit's LocalExecutor (timeout_min, signal_delay_s, ...)

A cell is checked exactly as ``icl-lens run`` would check it: its options are parsed by
``icl-lens run``'s own parser, its learning-rate grid resolved, its task loaded and its
demonstrations drawn. Any error names the key (``grid.shots``, ``run.task``, ...).

A cell's id is a hash of the settings written for it (not of defaults), so adding a value
to an axis leaves the other cells' ids, and their finished directories, as they were.

Refused before any cell is built: a key given twice (``max_queries`` and
``max-queries``, or ``[run] no_control`` with ``[grid] control``: one option), a value
listed twice in an axis (``seed = [1, "1"]``: both are ``--seed 1``), and a grid of more
than ``max_cells`` cells (:data:`MAX_CELLS` unless the caller raises it).

>>> grid = Grid.from_dict({"run": {"model": "gpt2", "task": "sst2"}, "grid": {"seed": [1, 2]}})
>>> [c.grid for c in grid.cells]
[{'seed': 1}, {'seed': 2}]
>>> grid.cells[0].name.startswith("seed=1-")
True
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_CELLS", "SEED_KEYS", "Cell", "Grid", "GridError", "run_parser"]

MAX_CELLS = 1000
"""Largest grid built without the caller's confirmation (``icl-lens sweep --max-cells``):
the paper's study is 72 cells and the real study 30 (about 4 minutes each on Gemma 3
270M), so 1000 cells are days of compute; a mistyped axis can mean a million."""

SEED_KEYS = ("seed", "order_seed")
"""Grid keys that draw demonstration sets and orders: aggregates average over them."""
SECTIONS = ("run", "grid", "slurm", "local")
LOAD_KEYS = ("data_source", "validation_fraction")
"""Keys that change where and how a task is loaded, named when it cannot be."""
OWNED = {
    "out": "the sweep names each cell's directory",
    "quiet": "give `icl-lens sweep --quiet` instead",
    "help": "not a setting",
}


class GridError(ValueError):
    """An invalid grid file; the message names the key."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit
        raise GridError(message)


def run_parser() -> argparse.ArgumentParser:
    """``icl-lens run``'s parser, raising :class:`GridError` instead of exiting."""
    from icl_lens.cli import run as run_cli

    sub = argparse.ArgumentParser(prog="icl-lens").add_subparsers(parser_class=_RaisingParser)
    run_cli.register(sub)
    return sub.choices["run"]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in OWNED}


def _canonical(key: str) -> str:
    return key.replace("-", "_")


def _short(value: Any) -> str:
    """A readable, file-name-safe rendering of a grid value (paths: their last part)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if isinstance(value, str) and ("/" in value or "\\" in value):
        text = Path(value).name or value
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:24] or "_"


@dataclass(frozen=True)
class Cell:
    """One combination of the grid: ``settings`` (run + grid, by option name), ``grid``
    (its values of the varying keys), a stable ``id`` and a readable ``name``."""

    settings: dict[str, Any]
    grid: dict[str, Any]
    id: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self):
        text = json.dumps(self.settings, sort_keys=True, separators=(",", ":"))
        cell_id = hashlib.sha256(text.encode()).hexdigest()[:10]
        slug = ",".join(f"{k}={_short(v)}" for k, v in self.grid.items())[:80] or "cell"
        object.__setattr__(self, "id", cell_id)
        object.__setattr__(self, "name", f"{slug}-{cell_id}")

    def argv(self, out: str | Path, options: Mapping[str, argparse.Action]) -> list[str]:
        """``icl-lens run`` arguments of this cell, writing to ``out``."""
        args: list[str] = []
        for key, value in self.settings.items():
            dest, value = _dest(key, value, options)
            action = options[dest]
            flag = max(action.option_strings, key=len)
            if action.nargs == 0:
                args += [flag] if value else []
            elif action.nargs in ("+", "*"):
                args += [flag, *(str(v) for v in ([value] if isinstance(value, str) else value))]
            else:  # --flag=value: a value such as "-1e-2" is not read as an option
                args.append(f"{flag}={json.dumps(value) if isinstance(value, dict) else value}")
        return ["run", *args, "--out", str(out)]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "grid": self.grid, "settings": self.settings}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        return cls(dict(data["settings"]), dict(data["grid"]))


def _dest(key: str, value: Any, options: Mapping[str, argparse.Action]) -> tuple[str, Any]:
    """The run option a grid key sets, and its value (``control = true`` sets
    ``--no-control`` to false)."""
    if key in options:
        return key, value
    return f"no_{key}", not value


def _check_value(where: str, key: str, value: Any, options) -> None:
    """A grid-file value the run option can take, before argparse sees it."""
    known = key in options or (f"no_{key}" in options and options[f"no_{key}"].nargs == 0)
    if not known:
        choices = sorted(k for k in options if not k.startswith("no_")) + sorted(
            k[3:] for k in options if k.startswith("no_")
        )
        raise GridError(
            f"{where}.{key}: not an `icl-lens run` option; choose from {', '.join(choices)}"
        )
    dest, _ = _dest(key, value, options)
    action = options[dest]
    if action.nargs == 0 and not isinstance(value, bool):
        raise GridError(f"{where}.{key}: a flag takes true or false, got {value!r}")
    if action.nargs in ("+", "*"):  # --model, --label-words: a string or a list of them
        many = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        if not (isinstance(value, str) or many):
            raise GridError(f"{where}.{key}: a string or a list of strings, got {value!r}")
        dashed = [v for v in ([value] if isinstance(value, str) else value) if v[:1] == "-"]
        if dashed:
            raise GridError(
                f"{where}.{key} = {dashed[0]!r}: `icl-lens run` would read a value starting "
                "with '-' as an option; give a path as ./" + dashed[0]
            )
    elif isinstance(value, list):
        raise GridError(
            f"{where}.{key}: `icl-lens run` takes one value here; a list of values to try is "
            "an axis: put it under [grid]"
        )
    elif isinstance(value, dict) and dest != "device_map":
        raise GridError(f"{where}.{key}: one value, not a table")


@dataclass
class Grid:
    """A parsed, checked grid file; :attr:`cells` in the order of the axes."""

    run: dict[str, Any]
    grid: dict[str, list[Any]]
    slurm: dict[str, Any] = field(default_factory=dict)
    local: dict[str, Any] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)

    task_fingerprints: dict[str, str] = field(default_factory=dict, repr=False)
    """Cell id -> :func:`~icl_lens.study.checkpoint.fingerprint_task` of its task, loaded
    as the cell loads it (filled by :meth:`check` with ``check_tasks``)."""

    @classmethod
    def from_toml(
        cls, path: str | Path, *, check_tasks: bool = True, max_cells: int = MAX_CELLS
    ) -> Grid:
        """Read and check ``path``; :class:`GridError` names the first bad key."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        path = Path(path)
        if not path.is_file():
            raise GridError(f"no grid file at {path}")
        try:
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise GridError(
                f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
            ) from None
        except OSError as err:
            raise GridError(f"cannot read {path}: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise GridError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(data, check_tasks=check_tasks, max_cells=max_cells)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, check_tasks: bool = False, max_cells: int = MAX_CELLS
    ) -> Grid:
        from icl_lens.sweep.executors import executor_table

        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise GridError(
                f"unknown section [{unknown[0]}]; a grid file has {', '.join(SECTIONS)}"
            )
        for name in SECTIONS:
            if not isinstance(data.get(name, {}), Mapping):
                raise GridError(f"[{name}] must be a table")
        options = _options(run_parser())
        run = _canonical_table("run", data.get("run", {}))
        axes = _canonical_table("grid", data.get("grid", {}))
        for where, table in (("run", run), ("grid", axes)):
            for key in table:
                if key in OWNED:
                    raise GridError(f"{where}.{key}: {OWNED[key]}")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise GridError(f"grid.{key}: a non-empty list of values, got {values!r}")
            for value in values:
                _check_value("grid", key, value, options)
            _refuse_repeated_values(key, values, options)
        for key, value in run.items():
            _check_value("run", key, value, options)
        _refuse_one_option_twice(run, axes, options)
        n_cells = math.prod(len(v) for v in axes.values())
        if n_cells > max_cells:
            sizes = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
            raise GridError(
                f"the grid has {n_cells:,} cells ({sizes}), more than {max_cells:,}; check "
                f"the axes, or confirm with --max-cells {n_cells}"
            )
        grid = cls(
            run=run,
            grid=axes,
            slurm=executor_table("slurm", data.get("slurm", {})),
            local=executor_table("local", data.get("local", {})),
        )
        combos = [dict(zip(axes, c, strict=True)) for c in itertools.product(*axes.values())]
        grid.cells = [Cell({**run, **combo}, combo) for combo in combos]
        grid.check(options, check_tasks=check_tasks)
        return grid

    def check(self, options=None, *, check_tasks: bool = True) -> None:
        """Parse every cell as ``icl-lens run`` would; with ``check_tasks`` load each task
        once and draw each cell's demonstrations."""
        parser = run_parser()
        options = options or _options(parser)
        flag_to_key = {}
        for key in {*self.run, *self.grid}:
            dest, _ = _dest(key, None, options)
            for flag in options[dest].option_strings:
                flag_to_key[flag] = key
        tasks: dict[str, tuple[Any, str]] = {}
        for cell in self.cells:
            try:
                args = parser.parse_args(cell.argv("OUT", options)[1:])
                _check_run_values(args)
            except GridError as err:
                raise GridError(self._name_key(str(err), flag_to_key, cell)) from None
            if check_tasks:
                self._check_task(args, cell, tasks)

    def _where(self, key: str) -> str:
        return f"grid.{key}" if key in self.grid else f"run.{key}"

    def _name_key(self, message: str, flag_to_key: Mapping[str, str], cell: Cell) -> str:
        if message.startswith("the following arguments are required"):
            missing = [
                _canonical(f.strip().lstrip("-")) for f in message.split(":", 1)[1].split(",")
            ]
            return f"set {', '.join(missing)} in [run] or [grid] (every cell needs it)"
        found = re.search(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        flags = found.group(1).split("/") if found else []
        key = next((flag_to_key[f] for f in flags if f in flag_to_key), None)
        if key is None:
            return message
        value = cell.settings.get(key)
        return f"{self._where(key)} = {value!r}: {found.group(2)}"

    def _check_task(self, args, cell: Cell, tasks: dict) -> None:
        """Load the cell's task exactly as its ``icl-lens run`` will (each distinct one
        once), record its fingerprint, draw the cell's demonstrations and their order."""
        import numpy as np

        from icl_lens.cli.run import task_load_options
        from icl_lens.data.demonstrations import sample_demonstrations
        from icl_lens.data.task_sources import TaskLoadError, load_task
        from icl_lens.study.checkpoint import fingerprint_task

        how = task_load_options(args)
        key = json.dumps([args.task, how], sort_keys=True)
        if key not in tasks:
            try:
                task = load_task(args.task, **how)
            except (TaskLoadError, ValueError, FileNotFoundError, KeyError, OSError) as err:
                given = [k for k in LOAD_KEYS if k in cell.settings]
                also = ", ".join(f"{self._where(k)} = {cell.settings[k]!r}" for k in given)
                raise GridError(
                    f"{self._where('task')} = {args.task!r}: cannot load the task"
                    f"{f' ({also})' if also else ''}: {_cli_wording(str(err))}"
                ) from None
            tasks[key] = (task, fingerprint_task(task))
        task, self.task_fingerprints[cell.id] = tasks[key]
        for name in SEED_KEYS:  # a seed numpy refuses is that key's fault, not the shots'
            value = getattr(args, name)
            try:
                if value is not None:
                    np.random.default_rng(value)
            except (ValueError, TypeError) as err:
                raise GridError(f"{self._where(name)} = {value!r}: {err} (a seed >= 0)") from None
        try:
            sample_demonstrations(task, args.shots, seed=args.seed, balanced=args.balanced)
        except ValueError as err:
            where = self._where("shots") if "shots" in cell.settings else "run.shots (default)"
            raise GridError(f"{where} = {args.shots}: {err} (cell {cell.name})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "grid": self.grid,
            "slurm": self.slurm,
            "local": self.local,
            "cells": [c.to_dict() for c in self.cells],
        }


def _check_run_values(args) -> None:
    """What ``icl-lens run`` refuses after parsing: impossible numbers, the learning-rate
    grid (as argparse words it, so the key is named)."""
    from icl_lens.cli.run import check_arguments
    from icl_lens.errors import UserError
    from icl_lens.study.lr_search import lr_grid

    try:
        check_arguments(args)
    except UserError as err:
        flag, _, rest = str(err).partition(" ")
        raise GridError(f"argument {flag}: {rest}") from None
    try:
        lr_grid(args.lr_grid)
    except ValueError as err:
        raise GridError(f"argument --lr-grid: {err}") from None


def _canonical_table(where: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with ``-`` spelled ``_``; one key written both ways is refused."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in table.items():
        name = _canonical(key)
        if name in out:
            raise GridError(
                f"{where}.{spelled[name]} and {where}.{key} are the same option; keep one"
            )
        out[name], spelled[name] = value, key
    return out


def _refuse_one_option_twice(run: Mapping[str, Any], axes: Mapping[str, Any], options) -> None:
    """Two keys that set one ``icl-lens run`` option (``control`` / ``no_control``, or a
    key in both [run] and [grid]) are refused: which one wins would be a guess."""
    seen: dict[str, str] = {}
    for where, table in (("run", run), ("grid", axes)):
        for key in table:
            dest, _ = _dest(key, None, options)
            if dest in seen:
                flag = max(options[dest].option_strings, key=len)
                raise GridError(
                    f"{seen[dest]} and {where}.{key} both set {flag}; give it in one place"
                )
            seen[dest] = f"{where}.{key}"


def _as_run_reads_it(value: Any, action: argparse.Action) -> Any:
    """``value`` as ``icl-lens run`` receives it (``1`` and ``"1"`` are both ``--seed 1``)."""
    if action.nargs == 0:
        return bool(value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if callable(action.type):
        try:
            return action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return str(value)  # argparse refuses it later, naming the key
    return str(value)


def _refuse_repeated_values(key: str, values: list[Any], options) -> None:
    dest, _ = _dest(key, None, options)
    seen: dict[Any, Any] = {}
    for value in values:
        read = _as_run_reads_it(value, options[dest])
        if read in seen:
            same = f"{seen[read]!r} and {value!r} are" if seen[read] != value else f"{value!r} is"
            raise GridError(
                f"grid.{key} lists one value twice ({same} the same `icl-lens run` setting); "
                "list each value once"
            )
        seen[read] = value


def _cli_wording(message: str) -> str:
    from icl_lens.cli.run import cli_wording

    return cli_wording(message)
