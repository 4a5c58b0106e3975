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

sys.path.insert(0, str(Path(__file__).parent))  # doc_checks beside this script
from doc_checks import check_doc, write_doc  # noqa: E402


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


def _value(x: float) -> str:
    return "undefined" if pd.isna(x) else f"{x:.2f}"


def _pick(table: pd.DataFrame, **where) -> pd.Series | None:
    rows = table
    for key, value in where.items():
        rows = rows[rows[key] == value]
    return None if rows.empty else rows.iloc[0]


def _model_name(model: list[str]) -> str:
    if model == ["toy"]:
        return "toy model"
    return "Gemma 3 270M" if "gemma-3-270m" in " ".join(model) else " ".join(model)


def numbers(directory: Path) -> dict:
    """A finished study's numbers: its table over the sets, each set's all-heads values."""
    study = json.loads((directory / "study.json").read_text())
    runs = {
        int(p.stem.split("-")[1]): Interventions.from_json(p)
        for p in sorted(directory.glob("seed-*.json"))
    }
    if not runs:
        raise SystemExit(f"{directory} holds no finished demonstration set (seed-S.json)")
    table = InterventionSet(runs).table()
    first = next(iter(runs.values()))
    per_set = [
        {"seed": seed, **{k: row[k] for k in ("intervention", "form", "metric", "value")}}
        for seed, res in runs.items()
        for _, row in res.frame.iterrows()
        if row["scope"] == "model" and row["quantity"] == "value" and row["control"] == "none"
    ]
    columns = ["intervention", "form", "scope", "control", "k", "metric", "quantity"]
    keep = table[table["scope"].isin(["model", "top_k", "random_k"])]
    keep = keep[[*columns, "value", "ci_low", "ci_high", "flag"]]
    return {
        "title": (
            f"{study['task']} on the {_model_name(study['model'])} ({len(runs)} demonstration "
            f"sets, k={study['settings']['shots']}, {first.info['n_queries']} queries, "
            f"{first.info['fit_queries']['used']} fit queries)"
        ),
        "shots": study["settings"]["shots"],
        "n_sets": len(runs),
        "n_queries": first.info["n_queries"],
        "table": json.loads(keep.to_json(orient="records")),
        "per_set": json.loads(pd.DataFrame(per_set).to_json(orient="records")),
    }


def _frame(data: dict) -> pd.DataFrame:
    frame = pd.DataFrame(data["table"])
    for column in ("value", "ci_low", "ci_high"):
        frame[column] = frame[column].astype(float)
    return frame


CURVES = [  # (title, intervention, form, quantity)
    ("Knockout: removed", "knockout", "", "removed"),
    ("Restore: recovered", "restore", "", "recovered"),
    ("Transplant linear: recovered", "transplant", "linear", "recovered"),
    ("Transplant fitted: recovered", "transplant", "fitted", "recovered"),
]
BEGIN = "<!-- interventions tables: python scripts/intervention_study.py tables --write -->"
END = "<!-- end of interventions tables -->"
NOTE = "intervals: over the demonstration sets and the shared queries; * flagged"


def render(data: dict) -> str:
    """docs/interventions.md's tables of one study's :func:`numbers`."""
    table = _frame(data)
    lines = [f"### {data['title']}", "", "| condition | accuracy | margin |", "|---|---|---|"]
    for name in ("zsl", "blind", "icl", "ft", "task_vector"):
        acc = _pick(table, intervention=name, scope="model", metric="accuracy", quantity="value")
        mar = _pick(table, intervention=name, scope="model", metric="margin", quantity="value")
        lines.append(f"| {name} | {_cell(acc)} | {_cell(mar)} |")
    lines += ["", "| share of ICL's effect | margin | accuracy |", "|---|---|---|"]
    for title, name, form, scope, control in ROWS:
        quantity = "removed" if name == "knockout" else "recovered"
        where = dict(intervention=name, form=form, scope=scope, control=control)
        cells = [
            _cell(_pick(table, **where, metric=metric, quantity=quantity))
            for metric in ("margin", "accuracy")
        ]
        lines.append(f"| {title} | {' | '.join(cells)} |")
    curve = table[(table["metric"] == "margin") & table["scope"].isin(["top_k", "random_k"])]
    ks = sorted(int(k) for k in curve["k"].unique())
    lines += ["", "| margin share, top-k heads (random k) | " + " | ".join(f"k={k}" for k in ks)]
    lines[-1] += " |"
    lines.append("|---|" + "---|" * len(ks))
    for title, name, form, quantity in CURVES:
        cells = []
        for k in ks:
            where = dict(k=k, intervention=name, form=form, quantity=quantity)
            top = _pick(curve, scope="top_k", **where)
            rnd = _pick(curve, scope="random_k", **where)
            text = "" if top is None else _value(top["value"])
            cells.append(text + ("" if rnd is None else f" ({_value(rnd['value'])})"))
        lines.append(f"| {title} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def render_all(data: dict) -> str:
    return "\n".join(render(study) for study in data["studies"].values()) + "\n" + NOTE


def namespace(data: dict) -> dict:
    """What a check may use: ``iv(study, intervention, stat="value", **where)`` (one row
    of the study's table; ``where`` over form, scope, control, k, metric, quantity, by
    default form "", scope model, control none, metric margin, quantity value),
    ``sets(study, intervention, metric="accuracy", form="")`` (each set's value) and
    ``study(name)`` (its shots, n_sets, n_queries)."""

    def iv(name, intervention, stat="value", **where):
        where = {"form": "", "scope": "model", "control": "none", "metric": "margin",
                 "quantity": "value", **where}  # fmt: skip
        rows = _frame(data["studies"][name])
        rows = rows[rows["intervention"] == intervention]
        for key, value in where.items():
            rows = rows[rows[key] == value]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} rows for {name}/{intervention}/{where}")
        return rows.iloc[0][stat]

    def sets(name, intervention, metric="accuracy", form=""):
        key = (intervention, form, metric)
        rows = data["studies"][name]["per_set"]
        return [r["value"] for r in rows if (r["intervention"], r["form"], r["metric"]) == key]

    return {"iv": iv, "sets": sets, "study": lambda name: data["studies"][name]}


def tables(args) -> int:
    # the studies in the order given: their tables appear in it
    data = {"studies": {Path(d).name: numbers(Path(d)) for d in args.directories}}
    if args.write:
        write_doc(args.write, data, render_all, BEGIN, END)
    else:
        print(render_all(data))
    return 0


def check_interventions_doc(doc: Path) -> list[str]:
    """What in ``doc`` (docs/interventions.md) its numbers file does not bear out."""
    return check_doc(doc, render_all, namespace, BEGIN, END)


def check(args) -> int:
    problems = check_interventions_doc(args.doc)
    print("\n".join(problems) or f"{args.doc}: every quoted number checks out")
    return 1 if problems else 0


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
    t.add_argument("--write", type=Path, metavar="DOC", help="store the numbers, rewrite DOC's")
    t.set_defaults(func=tables)
    c = sub.add_parser("check", help="check a document's reading against its numbers")
    c.add_argument("doc", type=Path)
    c.set_defaults(func=check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
