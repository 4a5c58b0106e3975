"""The command line's spelling of :class:`~icl_lens.study.settings.StudySettings`.

Every field of the settings becomes one option of ``icl-lens run`` (``shots`` ->
``--shots``, a true-by-default switch ``retest`` -> ``--no-retest``), with the field's
help text; :func:`study_settings` reads them back and refuses a value the settings
refuse, naming the option. A sweep's grid file uses the same names, so nothing is
listed twice.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_study_options(parser)
>>> study_settings(parser.parse_args(["--shots", "8", "--no-control"])).control
False
>>> study_settings(parser.parse_args(["--seed", "-5"]))
Traceback (most recent call last):
...
icl_lens.errors.UserError: --seed must be >= 0 (it seeds a random generator), got -5
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from icl_lens.errors import UserError
from icl_lens.study.settings import SettingsError, StudySettings

__all__ = ["add_study_options", "option_flag", "study_settings"]

_TEXT = ("lr_grid", "protocol", "ft_mode", "lr_selection", "other_task")
"""Fields the command line reads as text (the rest are whole numbers or switches)."""


def _dest(f: dataclasses.Field) -> str:
    """The argparse destination of a field (``--no-X`` switches: ``no_X``; ``n_draws``:
    ``control_draws``, as its flag)."""
    if f.metadata.get("negate"):
        return f"no_{f.name}"
    return option_flag(f.name)[2:].replace("-", "_")


def option_flag(name: str) -> str:
    """The command-line option of the setting ``name``.

    >>> option_flag("n_draws"), option_flag("retest"), option_flag("kendall_queries")
    ('--control-draws', '--no-retest', '--kendall-queries')
    """
    f = {f.name: f for f in dataclasses.fields(StudySettings)}[name]
    if f.metadata.get("negate"):
        return "--no-" + name.replace("_", "-")
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def add_study_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`StudySettings` field, with its help and default."""
    for f in dataclasses.fields(StudySettings):
        meta, flag, dest = f.metadata, option_flag(f.name), _dest(f)
        if meta.get("negate") or f.default is False:
            parser.add_argument(flag, dest=dest, action="store_true", help=meta["help"])
            continue
        parser.add_argument(
            flag,
            dest=dest,
            type=str if f.name in _TEXT else int,
            default=meta.get("cli_default", f.default),
            choices=meta.get("choices"),
            help=meta["help"],
        )


def study_settings(args: argparse.Namespace) -> StudySettings:
    """The :class:`StudySettings` that ``args`` (parsed with :func:`add_study_options`)
    give; :class:`UserError` naming the option for a value that cannot work."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(StudySettings):
        value = getattr(args, _dest(f))
        values[f.name] = not value if f.metadata.get("negate") else value
    try:
        return StudySettings(**values)
    except SettingsError as err:
        raise UserError(f"{option_flag(err.name)} {err.problem}") from None
