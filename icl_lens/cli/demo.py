"""``icl-lens demo``: the whole pipeline offline, on the embedded toy model.

    icl-lens demo --out runs/demo

ZSL, ICL and FT on a held-out instance of the toy task (label words the model never
saw in training, so only the demonstrations say which word means which class), for
three demonstration sets (seeds 1, 2, 3): the metrics of the first set with every
baseline (shuffled pairings, the test-retest ceilings, the untrained-weights control
over three draws) and flags where a value cannot speak, then every metric over the
three sets with an interval over sets and queries (docs/method.md, "Intervals").
Writes the first set's ``OUT/results.json``, ``OUT/metrics.csv``, ``OUT/views.json``
and ``OUT/report.html``, and the table over the sets as ``OUT/runs.csv``.

``--update-readme`` writes what it prints into README.md between the
``<!-- demo output -->`` markers (run it from the repository root after a change that
moves the numbers; a test fails while README and the demo disagree).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from icl_lens.errors import UserError

INSTANCE = 3
"""Held-out toy task instance of the demo (seeds below 10**6 are never trained on)."""
LR_GRID = "0.1,0.3,1,3"
"""FT learning rates: the toy model's best lies near 1 with the mean token loss
(docs/toy-model.md), above the paper's grid, which tops out at 0.9."""
SEEDS = (1, 2, 3)
BATCH_SIZE = 64
"""Queries per forward: the toy model is small, so bigger batches mostly save overhead."""
README_BEGIN = "<!-- demo output: `icl-lens demo --update-readme` writes this block -->"
README_END = "<!-- end of demo output -->"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run ZSL vs ICL vs FT, metrics and report on the embedded toy model (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="default runs/demo")
    p.add_argument("--instance", type=int, default=INSTANCE, help="held-out toy task seed")
    p.add_argument("--shots", type=int, default=16, help="demonstrations (default 16)")
    p.add_argument("--queries", type=int, default=256, help="validation queries (default 256)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(SEEDS),
        help="demonstration sets (default 1 2 3); the report shows the first",
    )
    p.add_argument("--lr-grid", default=LR_GRID, help=f"default {LR_GRID}; or 'paper', 'short'")
    p.add_argument(
        "--protocol", choices=("prediction", "dai2023"), default="prediction", help="see `run`"
    )
    p.add_argument(
        "--ft-mode",
        choices=("standard", "layer_causal", "both"),
        default="both",
        help="FT as the paper, Deutch et al.'s layer-causal variant, or both (default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the toy model's tensors are too small for more to "
        "pay, and on a busy machine threads wait on each other: 8 s instead of 77 s of CPU "
        "for one comparison, measured with the machine's 2 cores loaded)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--update-readme",
        nargs="?",
        const=Path("README.md"),
        type=Path,
        metavar="README",
        help="write the printed tables into README.md (or the given file) between its "
        "demo-output markers",
    )
    p.set_defaults(func=run)


def update_readme(path: Path, text: str) -> None:
    """Replace the fenced block between the demo-output markers of ``path`` with ``text``."""
    try:
        page = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}; pass the README to update") from err
    if README_BEGIN not in page or README_END not in page:
        raise UserError(f"{path} has no demo-output markers ({README_BEGIN} ... {README_END})")
    head, rest = page.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = f"{README_BEGIN}\n\n```\n{text.rstrip()}\n```\n\n{README_END}"
    path.write_text(head + block + tail)


def readme_block(page: str) -> str:
    """The text of the fenced block between the demo-output markers of a README."""
    inner = page.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    return inner.strip().removeprefix("```").removesuffix("```").strip("\n")


def run(args) -> int:
    import torch

    from icl_lens.toy import TRAIN_SEED_BASE

    if args.instance >= TRAIN_SEED_BASE:
        raise UserError(f"--instance must be below {TRAIN_SEED_BASE}: larger seeds are trained on")
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".icl-lens-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {out}: {err}; pass --out DIR") from err
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)  # the process's setting, for whoever called us


def _run(args, out: Path) -> int:
    from icl_lens.cli.tables import format_aggregate, format_table
    from icl_lens.files import OutputPathError
    from icl_lens.quickstart import toy_model
    from icl_lens.study.runs import compare_runs
    from icl_lens.toy import toy_task
    from icl_lens.views.report import write_report
    from icl_lens.views.run_data import save_views

    model = toy_model()
    task = toy_task(args.instance, n_train=max(64, args.shots), n_validation=args.queries)
    runs = compare_runs(
        model,
        task,
        seeds=args.seeds,
        shots=args.shots,
        lr_grid=args.lr_grid,
        protocol=args.protocol,
        ft_mode=args.ft_mode,
        batch_size=BATCH_SIZE,
        checkpoint_dir=out / "checkpoints",
        progress=not args.quiet,
    )
    cmp = runs.runs[args.seeds[0], None]
    cmp.config.update({"model_name": "icl-lens toy model", "task_source": task.spec.name})
    cmp.to_json(out / "results.json")
    cmp.to_csv(out / "metrics.csv")
    aggregate = runs.table()
    aggregate.to_csv(out / "runs.csv", index=False)
    try:
        save_views(out, model, cmp.prompt, ft_lr=cmp.lr, spec=cmp.spec)
        report = write_report(out)
    except OutputPathError as err:
        raise UserError(str(err)) from err
    seeds = ", ".join(str(s) for s in args.seeds)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print(f"toy task instance {args.instance}: label words {list(task.spec.label_words)}")
        print(f"demonstration set 1 of {len(args.seeds)} (seed {args.seeds[0]}):")
        print(format_table(cmp, legend=True))
        title = (
            f"\nover {len(args.seeds)} demonstration sets (seeds {seeds}): mean, and an "
            "interval over sets (t) and queries (bootstrap)"
        )
        print(format_aggregate(aggregate, title=title))
    print(text.getvalue(), end="")
    if args.update_readme is not None:
        update_readme(args.update_readme, text.getvalue())
        print(f"updated {args.update_readme}", file=sys.stderr)
    print(
        f"\nwrote {out / 'results.json'}, {out / 'metrics.csv'}, {out / 'runs.csv'} and {report}",
        file=sys.stderr,
    )
    print(f"open {report} in a browser (it works offline)", file=sys.stderr)
    return 0
