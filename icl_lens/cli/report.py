"""``icl-lens report DIR``: one self-contained offline HTML page for a run directory, or
for a sweep directory (the paper's table across its cells).

>>> report_main(["runs/toy"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from icl_lens.errors import UserError
from icl_lens.files import OutputPathError
from icl_lens.views.report import write_report


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        metavar="DIR",
        help="run directory (results.json, metrics.csv, views.json) or sweep directory",
    )
    parser.add_argument(
        "--out", metavar="PATH", help="where to write the page (default DIR/report.html)"
    )
    parser.add_argument("--title", help="page title (default: from the run's task)")


def _write_sweep_report(args: argparse.Namespace) -> Path:
    """A sweep directory: its tables, rebuilt from the cells there unless they were built
    from exactly those cells, then its page."""
    from icl_lens.sweep.tables import current_tables
    from icl_lens.views.sweep_report import write_sweep_report

    root = Path(args.dir)
    current_tables(root)
    return write_sweep_report(root, args.out, title=args.title)


def _run(args: argparse.Namespace) -> int:
    try:
        if (Path(args.dir) / "sweep.json").exists():
            path = _write_sweep_report(args)
        else:
            path = write_report(args.dir, args.out, title=args.title)
    except (FileNotFoundError, ValueError, OutputPathError) as err:
        raise UserError(str(err)) from err
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add the ``report`` subcommand to the ``icl-lens`` parser."""
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained offline HTML page for a run directory",
        description="Write DIR/report.html: accuracies, metrics with baselines and "
        "intervals, per-layer plots and the circuitsvis panels of the top heads.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def report_main(argv: Sequence[str] | None = None) -> int:
    """``icl-lens report`` on its own: ``report_main(["runs/toy"])``; returns the exit
    code (2 with a one-line message for a missing run or an unwritable path)."""
    parser = argparse.ArgumentParser(prog="icl-lens report")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as err:
        print(f"icl-lens report: error: {err}", file=sys.stderr)
        return 2
