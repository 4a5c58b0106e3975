"""``icl-lens demo``: the whole pipeline offline, on the embedded toy model.

    icl-lens demo --out runs/demo

ZSL, ICL and FT on a held-out instance of the toy task (label words the model never
saw in training, so only the demonstrations say which word means which class), the four
metrics with their baselines and the untrained-weights control, the circuitsvis views of
the top heads, and one offline HTML report. Writes ``OUT/results.json``,
``OUT/metrics.csv``, ``OUT/views.json`` and ``OUT/report.html``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from icl_lens.errors import UserError

INSTANCE = 3
"""Held-out toy task instance of the demo (seeds below 10**6 are never trained on)."""
LR_GRID = "0.1,0.3,1,3"
"""FT learning rates: the toy model's best lies near 1 with the mean token loss
(docs/toy-model.md), above the paper's grid, which tops out at 0.9."""


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
    p.add_argument("--seed", type=int, default=1, help="demonstration seed (default 1)")
    p.add_argument("--lr-grid", default=LR_GRID, help=f"default {LR_GRID}; or 'paper', 'short'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from icl_lens.cli.run import format_table
    from icl_lens.files import OutputPathError
    from icl_lens.quickstart import toy_model
    from icl_lens.study.compare import compare
    from icl_lens.toy import TRAIN_SEED_BASE, toy_task
    from icl_lens.views.report import write_report
    from icl_lens.views.run_data import save_views

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
    model = toy_model()
    task = toy_task(args.instance, n_train=max(64, args.shots), n_validation=args.queries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmp = compare(
            model,
            task,
            shots=args.shots,
            seed=args.seed,
            lr_grid=args.lr_grid,
            checkpoint_dir=out / "checkpoints",
            progress=not args.quiet,
        )
    cmp.config.update({"model_name": "icl-lens toy model", "task_source": task.spec.name})
    cmp.to_json(out / "results.json")
    cmp.to_csv(out / "metrics.csv")
    try:
        save_views(out, model, cmp.prompt, ft_lr=cmp.lr, spec=cmp.spec)
        report = write_report(out)
    except OutputPathError as err:
        raise UserError(str(err)) from err
    print(f"toy task instance {args.instance}: label words {list(task.spec.label_words)}")
    print(format_table(cmp))
    print(f"\nwrote {out / 'results.json'}, {out / 'metrics.csv'} and {report}", file=sys.stderr)
    print(f"open {report} in a browser (it works offline)", file=sys.stderr)
    return 0
