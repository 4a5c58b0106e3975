"""``icl-lens momentum``: vanilla vs momentum attention trained from scratch on the toy corpus.

    icl-lens momentum --out runs/momentum            # the documented run (docs/momentum.md)
    icl-lens momentum --out /tmp/m --steps 20 --seeds 0 --eval-instances 4   # a quick look

Writes ``OUT/results.json`` (every run and the summary), ``OUT/summary.csv`` and
``OUT/momentum.svg``, and prints mean ± std over seeds per variant. Finished runs are
kept in ``OUT/runs``; rerunning the same command resumes.

>>> import argparse
>>> sub = argparse.ArgumentParser().add_subparsers()
>>> register(sub)
>>> args = sub.choices["momentum"].parse_args(["--out", "x", "--seeds", "0", "1"])
>>> study_config(args).seeds
(0, 1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_lens.errors import UserError

DESCRIPTION = """\
Train small GPT-2 models from scratch on the toy corpus, vanilla and with momentum
attention (fixed eta values and a learned per-head eta), with identical budgets per
seed, and measure held-out perplexity and ICL accuracy at several k.

  icl-lens momentum --out runs/momentum

Writes OUT/results.json, OUT/summary.csv and OUT/momentum.svg. Finished runs are kept in
OUT/runs: run the same command again after an interruption to continue."""


def register(subparsers) -> None:
    from icl_lens.momentum_study.config import StudyConfig

    d = StudyConfig()
    p = subparsers.add_parser(
        "momentum",
        help="train vanilla vs momentum attention on the toy corpus and compare",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(d.variants),
        help=f"vanilla, learned or eta<float> (default: {' '.join(d.variants)})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--steps", type=int, default=d.steps, help=f"default {d.steps}")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--d-model", type=int, default=d.n_embd)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--learned-eta-init", type=float, default=d.learned_eta_init)
    p.add_argument("--shots", type=int, nargs="+", default=list(d.shots))
    p.add_argument(
        "--eval-instances",
        type=int,
        default=d.eval_instances,
        help=f"held-out instances per kind (default {d.eval_instances})",
    )
    p.add_argument("--eval-queries", type=int, default=d.eval_queries)
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences)
    p.add_argument(
        "--jobs", type=int, default=2, help="parallel processes, 1 torch thread each (default 2)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-step log")
    p.set_defaults(func=run)


def study_config(args):
    from icl_lens.momentum_study.config import StudyConfig

    return StudyConfig(
        variants=tuple(args.variants),
        seeds=tuple(args.seeds),
        steps=args.steps,
        batch_size=args.batch_size,
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        learned_eta_init=args.learned_eta_init,
        shots=tuple(args.shots),
        eval_instances=args.eval_instances,
        eval_queries=args.eval_queries,
        eval_sequences=args.eval_sequences,
    )


def run(args) -> int:
    from icl_lens.momentum_study.outputs import format_table
    from icl_lens.momentum_study.study import run_study

    try:
        config = study_config(args)
    except ValueError as err:
        raise UserError(str(err)) from err

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    results = run_study(config, args.out, jobs=args.jobs, log=log)
    print(format_table(results))
    meta = results["meta"]
    print(
        f"wall {meta['wall_s']:.0f} s ({meta['runs_trained']} runs trained, "
        f"{meta['runs_reused']} reused, {meta['jobs']} jobs); wrote {args.out / 'results.json'}, "
        f"{args.out / 'summary.csv'} and {args.out / 'momentum.svg'}"
    )
    if results["missing"]:
        print(f"missing runs: {', '.join(results['missing'])}", file=sys.stderr)
        return 1
    return 0
