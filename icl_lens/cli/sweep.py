"""``icl-lens sweep GRID.toml --out DIR``: every combination of a grid as a resumable
``icl-lens run``, on this machine or a SLURM cluster (submitit; ``icl-lens[sweep]``).

    icl-lens sweep study.toml --out runs/study                      # one local worker
    icl-lens sweep study.toml --out runs/study --executor slurm --max-parallel 16
    icl-lens report runs/study                                       # the paper's tables

See docs/sweeps.md for the grid file. Exit status: 0 when every cell is done, 1 when
some failed (DIR/failures.json says why; rerun the same command to retry them), 2 for an
invalid grid (nothing is submitted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_lens.errors import UserError

DESCRIPTION = """\
Run every combination of a grid file's [grid] values, with its fixed [run] settings, as
an ordinary `icl-lens run` directory under DIR/cells/, then write DIR/summary.parquet
(every cell's metrics, the grid values as columns) and DIR/aggregate.parquet (mean and
spread over seeds). Rerunning the same command skips finished cells and resumes the
others from their checkpoints; a failing cell is recorded in DIR/failures.json and the
others go on. The grid is checked before anything is submitted.

  icl-lens sweep study.toml --out runs/study --executor slurm --max-parallel 16"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of icl-lens runs locally or on SLURM (needs icl-lens[sweep])",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("grid", type=Path, metavar="GRID.toml", help="the grid file")
    p.add_argument("--out", required=True, type=Path, help="sweep directory")
    p.add_argument(
        "--executor",
        choices=("debug", "local", "slurm"),
        default="local",
        help="local: subprocesses on this machine (default); slurm: a job array; "
        "debug: in this process",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="workers at once (default: 1 locally, one job per cell on SLURM); the cells are "
        "split between them by model, each model loaded once per worker",
    )
    p.add_argument(
        "--max-cells",
        type=int,
        default=None,
        metavar="N",
        help="run a grid of up to N cells (default 1000: a larger grid is refused, as a "
        "mistyped axis can mean a million cells; give its cell count to confirm it)",
    )
    p.add_argument(
        "--recompute-changed",
        action="store_true",
        help="cells computed with other task data or model files than now are refused; "
        "with this flag they are recomputed (their old directories move to DIR/replaced/)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the grid and list its cells; run nothing"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("icl-lens sweep needs submitit: pip install 'icl-lens[sweep]'") from None
    from icl_lens.cli.out_dir import check_output_directory
    from icl_lens.sweep.grid import MAX_CELLS, Grid, GridError
    from icl_lens.sweep.inputs import cell_inputs, changed_cells
    from icl_lens.sweep.launch import sweep
    from icl_lens.sweep.status import cell_directory, cell_state

    check_output_directory(args.out)
    if args.max_cells is not None and args.max_cells < 1:
        raise UserError(f"--max-cells must be >= 1, got {args.max_cells}")
    try:
        grid = Grid.from_toml(args.grid, max_cells=args.max_cells or MAX_CELLS)
    except GridError as err:
        raise UserError(f"{args.grid}: {err}") from None
    if args.dry_run:
        changed, _ = changed_cells(grid, args.out, cell_inputs(grid, args.out, save=False))
        for cell in grid.cells:
            state = "changed" if cell.id in changed else cell_state(cell_directory(args.out, cell))
            why = f"  ({'; '.join(changed[cell.id])} changed)" if cell.id in changed else ""
            print(f"{state:8} {args.out / 'cells' / cell.name}{why}")
        print(f"{len(grid.cells)} cells; nothing submitted (--dry-run)")
        return 0
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        result = sweep(
            grid,
            args.out,
            executor=args.executor,
            max_parallel=args.max_parallel,
            quiet=args.quiet,
            log=log,
            recompute_changed=args.recompute_changed,
        )
    except GridError as err:
        raise UserError(str(err)) from None
    summary, aggregate = result.tables
    print(
        f"{len(result.done)} of {len(grid.cells)} cells done; wrote {summary} and {aggregate}"
        f"; `icl-lens report {args.out}` makes the page"
    )
    if result.failed:
        print(
            f"{len(result.failed)} cells failed (errors and logs in "
            f"{args.out / 'failures.json'}); run the same command again to retry them",
            file=sys.stderr,
        )
        for failure in result.failed[:5]:
            print(f"  {failure['name']}: {failure['error']}", file=sys.stderr)
        return 1
    return 0
