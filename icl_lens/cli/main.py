"""The ``icl-lens`` command: one subcommand per module, registered here.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds
its parser and sets ``func`` (``args -> exit code``). Add a subcommand by writing that
module and naming it in :data:`SUBCOMMANDS`; modules are imported lazily, so
``icl-lens --help`` stays fast and a broken optional subcommand cannot break the others.

>>> main(["--version"])  # doctest: +SKIP
icl-lens 0.1.0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence

from icl_lens.errors import UserError
from icl_lens.files import OutputPathError

SUBCOMMANDS: dict[str, str] = {
    "demo": "icl_lens.cli.demo",
    "run": "icl_lens.cli.run",
    "sweep": "icl_lens.cli.sweep",
    "bench": "icl_lens.cli.bench",
    "report": "icl_lens.cli.report",
    "momentum": "icl_lens.cli.momentum",
}
"""Subcommand name -> module with ``register(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    from icl_lens import __version__

    parser = argparse.ArgumentParser(
        prog="icl-lens",
        description="Does in-context learning behave like finetuning, head by head?",
    )
    parser.add_argument("--version", action="version", version=f"icl-lens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).register(sub)
        except ImportError as err:  # pragma: no cover - an optional subcommand missing
            print(f"icl-lens: subcommand {name!r} unavailable: {err}", file=sys.stderr)
    return parser


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


@contextlib.contextmanager
def _one_line_warnings(prefix: str):
    """Warnings as ``icl-lens run: warning: ...`` lines, not file:line plus source."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kw: f"{prefix}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``icl-lens``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _one_line_warnings(f"icl-lens {args.command}"):
            return int(args.func(args) or 0)
    except (UserError, OutputPathError) as err:
        print(f"icl-lens {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `icl-lens run ... | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error at exit
        print(
            f"icl-lens {args.command}: error: stopped printing, the output pipe closed (e.g. "
            "`| head`); run it without the pipe to see everything (files already written are "
            "complete: `icl-lens run` writes its results before it prints them)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"icl-lens {args.command}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
