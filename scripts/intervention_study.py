"""The interventions study of docs/interventions.md: run it, then its tables.

    python scripts/intervention_study.py run --model toy --task toy-3 --shots 16 \
        --seeds 1 2 3 --max-queries 64 --fit-queries 32 --lr-grid 0.1,0.3,1 --out runs/iv-toy
    python scripts/intervention_study.py run --model $(python -m icl_lens.model.wheels) \
        --task mr --shots 16 --max-queries 24 --fit-queries 12 --no-head-scan \
        --out runs/iv-mr
    python scripts/intervention_study.py tables runs/iv-toy runs/iv-mr runs/iv-sst2

``run`` calls :func:`icl_lens.intervene_runs` with its checkpoints in ``OUT/checkpoints``
(rerun the same command to resume) and writes each demonstration set's result as
``OUT/seed-S.json`` and the settings as ``OUT/study.json``. ``tables`` prints the
markdown tables of docs/interventions.md from such directories: per study, the
conditions' accuracy and margin, then every share with its interval over the sets and
queries, the top-k curve, FT's and the task vector's recovery and the controls. The
numbers in docs/interventions.md come from it; rerun it to check them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

import icl_lens as il
from icl_lens.files import atomic_write_text
from icl_lens.study.intervention_result import Interventions, InterventionSet


def _model(names: list[str]):
    if names == ["toy"]:
        return il.toy_model()
    return il.load_model(names[0] if len(names) == 1 else names)


def _task(name: str):
    if name.startswith("toy-"):  # a held-out instance of the toy family (the demo's: toy-3)
        from icl_lens.toy import toy_task

        return toy_task(int(name.split("-", 1)[1]), n_train=64, n_validation=256)
    return il.load_task(name, source="staicc")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = il.StudySettings(
        shots=args.shots,
        max_queries=args.max_queries,
        fit_queries=args.fit_queries,
        lr_grid=args.lr_grid,
        head_scan=not args.no_head_scan,
        retest=False,
        control=False,
    )
    study = {
        "model": args.model,
        "task": args.task,
        "seeds": args.seeds,
        "settings": settings.to_dict(),
    }
    atomic_write_text(out / "study.json", json.dumps(study, indent=2))
    model, task = _model(args.model), _task(args.task)
    for seed in args.seeds:
        start = time.perf_counter()
        res = il.intervene(
            model,
            task,
            settings.replace(seed=seed),
            checkpoint_dir=out / "checkpoints" / f"seed-{seed}",
            progress=not args.quiet,
        )
        res.to_json(out / f"seed-{seed}.json")
        took = time.perf_counter() - start
        print(f"seed {seed}: {took:.0f} s ({len(res.stages['computed'])} stages computed)")
    return 0


ROWS = [  # (title, intervention, form, scope, control)
    ("Restore(all) = ICL", "restore", "", "model", "none"),
    ("Knockout(all) = Blind", "knockout", "", "model", "none"),
    ("Transplant(all, linear): dW_ICL q as is", "transplant", "linear", "model", "none"),
    ("Transplant(all, fitted): c_h dW_ICL q", "transplant", "fitted", "model", "none"),
    ("Transplant(all, softmax): the wiring check", "transplant", "softmax", "model", "none"),
    ("FT (against ZSL)", "ft", "", "model", "none"),
    ("task vector (against ZSL)", "task_vector", "", "model", "none"),
    ("control: permuted labels, Restore(all)", "restore", "", "model", "permuted_labels"),
    ("control: permuted labels, fitted", "transplant", "fitted", "model", "permuted_labels"),
    ("control: other task, Restore(all)", "restore", "", "model", "other_task"),
    ("control: other task, fitted", "transplant", "fitted", "model", "other_task"),
    ("control: random update, linear", "transplant", "linear", "model", "random_update"),
    ("control: random update, fitted", "transplant", "fitted", "model", "random_update"),
]


def _cell(row: pd.Series | None) -> str:
    if row is None or pd.isna(row["value"]):
        return "undefined"
    text = f"{row['value']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    return text + (" *" if isinstance(row.get("flag"), str) and row["flag"] else "")


def _pick(table: pd.DataFrame, **where) -> pd.Series | None:
    rows = table
    for key, value in where.items():
        rows = rows[rows[key] == value]
    return None if rows.empty else rows.iloc[0]


def study_tables(directory: Path) -> str:
    study = json.loads((directory / "study.json").read_text())
    runs = {
        int(p.stem.split("-")[1]): Interventions.from_json(p)
        for p in sorted(directory.glob("seed-*.json"))
    }
    table = InterventionSet(runs).table()
    first = next(iter(runs.values()))
    lines = [
        f"### {study['task']} ({len(runs)} demonstration sets, k={study['settings']['shots']}, "
        f"{first.info['n_queries']} queries, {first.info['fit_queries']['used']} fit queries)",
        "",
        "| condition | accuracy | margin |",
        "|---|---|---|",
    ]
    for name in ("zsl", "blind", "icl", "ft", "task_vector"):
        acc = _pick(table, intervention=name, scope="model", metric="accuracy", quantity="value")
        mar = _pick(table, intervention=name, scope="model", metric="margin", quantity="value")
        lines.append(f"| {name} | {_cell(acc)} | {_cell(mar)} |")
    lines += ["", "| share of ICL's effect | margin | accuracy |", "|---|---|---|"]
    for title, name, form, scope, control in ROWS:
        quantity = "removed" if name == "knockout" else "recovered"
        cells = [
            _cell(
                _pick(
                    table,
                    intervention=name,
                    form=form,
                    scope=scope,
                    control=control,
                    metric=metric,
                    quantity=quantity,
                )
            )
            for metric in ("margin", "accuracy")
        ]
        lines.append(f"| {title} | {' | '.join(cells)} |")
    curve = table[(table["metric"] == "margin") & table["scope"].isin(["top_k", "random_k"])]
    ks = sorted(curve["k"].unique())
    head = " | ".join(f"k={k}" for k in ks)
    lines += ["", f"| margin share, top-k heads (random k) | {head} |"]
    lines.append("|---|" + "---|" * len(ks))
    for title, name, form, quantity in (
        ("Knockout: removed", "knockout", "", "removed"),
        ("Restore: recovered", "restore", "", "recovered"),
        ("Transplant linear: recovered", "transplant", "linear", "recovered"),
        ("Transplant fitted: recovered", "transplant", "fitted", "recovered"),
    ):
        cells = []
        for k in ks:
            top = _pick(curve, scope="top_k", k=k, intervention=name, form=form, quantity=quantity)
            rnd = _pick(
                curve, scope="random_k", k=k, intervention=name, form=form, quantity=quantity
            )
            text = "" if top is None else f"{top['value']:.2f}"
            cells.append(text + ("" if rnd is None else f" ({rnd['value']:.2f})"))
        lines.append(f"| {title} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def tables(args) -> int:
    for directory in args.directories:
        print(study_tables(Path(directory)))
    print("intervals: over the demonstration sets and the shared queries; * flagged")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the interventions over demonstration sets")
    p.add_argument("--model", nargs="+", required=True, help="'toy', a model or GGUF chunks")
    p.add_argument("--task", required=True, help="a paper task (StaICC's copy) or toy-N")
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-queries", type=int, default=32)
    p.add_argument("--fit-queries", type=int, default=16)
    p.add_argument("--lr-grid", default="short")
    p.add_argument("--no-head-scan", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    t = sub.add_parser("tables", help="markdown tables of finished studies")
    t.add_argument("directories", nargs="+")
    t.set_defaults(func=tables)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
