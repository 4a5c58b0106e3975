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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SEED_KEYS", "Cell", "Grid", "GridError", "run_parser"]

SEED_KEYS = ("seed", "order_seed")
"""Grid keys that draw demonstration sets and orders: aggregates average over them."""
SECTIONS = ("run", "grid", "slurm", "local")
OWNED = {
    "out": "the sweep names each cell's directory",
    "quiet": "give `icl-lens sweep --quiet` instead",
    "help": "not a setting",
}
SLURM_GENERIC = ("timeout_min", "mem_gb", "gpus_per_node", "cpus_per_task", "name")
LOCAL_KEYS = ("timeout_min", "signal_delay_s", "gpus_per_node", "visible_gpus", "max_num_timeout")
ONE_TASK = ("nodes", "tasks_per_node", "ntasks_per_node")


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
            elif isinstance(value, dict):
                args += [flag, json.dumps(value)]
            else:
                args += [flag, str(value)]
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

    @classmethod
    def from_toml(cls, path: str | Path, *, check_tasks: bool = True) -> Grid:
        """Read and check ``path``; :class:`GridError` names the first bad key."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        path = Path(path)
        if not path.is_file():
            raise GridError(f"no grid file at {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise GridError(f"{path} is not valid TOML: {err}") from None
        return cls.from_dict(data, check_tasks=check_tasks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, check_tasks: bool = False) -> Grid:
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise GridError(
                f"unknown section [{unknown[0]}]; a grid file has {', '.join(SECTIONS)}"
            )
        for name in SECTIONS:
            if not isinstance(data.get(name, {}), Mapping):
                raise GridError(f"[{name}] must be a table")
        options = _options(run_parser())
        run = {_canonical(k): v for k, v in data.get("run", {}).items()}
        axes = {_canonical(k): v for k, v in data.get("grid", {}).items()}
        for where, table in (("run", run), ("grid", axes)):
            for key in table:
                if key in OWNED:
                    raise GridError(f"{where}.{key}: {OWNED[key]}")
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise GridError(f"grid.{key}: a non-empty list of values, got {values!r}")
            if key in run:
                raise GridError(f"grid.{key}: also set in [run]; give it in one place")
            for value in values:
                _check_value("grid", key, value, options)
        for key, value in run.items():
            _check_value("run", key, value, options)
        grid = cls(
            run=run,
            grid=axes,
            slurm=_executor_table("slurm", data.get("slurm", {})),
            local=_executor_table("local", data.get("local", {})),
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
        tasks: dict[str, Any] = {}
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
        from icl_lens.data.demonstrations import sample_demonstrations
        from icl_lens.data.task_sources import TaskLoadError, load_task

        words = None
        if args.label_words:
            words = [w if w[:1].isspace() else " " + w for w in args.label_words]
        key = json.dumps([args.task, args.template, words, args.max_queries])
        if key not in tasks:
            try:
                tasks[key] = load_task(
                    args.task,
                    template=args.template,
                    label_words=words,
                    validation_limit=args.max_queries,
                )
            except (TaskLoadError, ValueError, FileNotFoundError, KeyError) as err:
                raise GridError(
                    f"{self._where('task')} = {args.task!r}: cannot load the task: {err}"
                ) from None
        try:
            sample_demonstrations(tasks[key], args.shots, seed=args.seed, balanced=args.balanced)
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


def _executor_table(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """The [slurm] / [local] table, its keys checked against what submitit takes."""
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
        out[bare] = value
    return out
