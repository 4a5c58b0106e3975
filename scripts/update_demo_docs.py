"""Regenerate every demo number the docs show, from real runs: one command.

    python scripts/update_demo_docs.py          # from the repository root, ~2-3 min

1. README.md's demo block: ``icl-lens demo --update-readme`` (tests/test_demo.py fails
   while README and the demo disagree);
2. docs/method.md's table of the demo under both protocols: the demo's first
   demonstration set (seed 1, standard FT) with ``protocol="prediction"`` and
   ``protocol="dai2023"``, between the ``<!-- protocols on the demo -->`` markers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from icl_lens.cli import main
from icl_lens.cli.demo import BATCH_SIZE, INSTANCE, LR_GRID
from icl_lens.quickstart import toy_model
from icl_lens.study.compare import compare
from icl_lens.toy import toy_task

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- protocols on the demo: scripts/update_demo_docs.py writes this table -->"
END = "<!-- end of protocols on the demo -->"


def protocol_table() -> str:
    torch.set_num_threads(1)
    model = toy_model()
    task = toy_task(INSTANCE, n_train=64, n_validation=256)
    runs = {
        p: compare(
            model,
            task,
            shots=16,
            seed=1,
            lr_grid=LR_GRID,
            protocol=p,
            batch_size=BATCH_SIZE,
            progress=False,
        )  # fmt: skip
        for p in ("prediction", "dai2023")
    }
    tables = {p: c.table() for p, c in runs.items()}
    acc = {p: c.accuracy for p, c in runs.items()}
    shuffled = "its shuffled queries"
    head = f"| metric | variant | `prediction` | {shuffled} | `dai2023` | {shuffled} |"
    lines = [head, "|---|---|---|---|---|---|"]
    for (metric, variant), row in tables["prediction"].iterrows():
        other = tables["dai2023"].loc[(metric, variant)]

        def cell(r, col):
            v = r.get(col)
            return "" if v is None or v != v else f"{v:.4f}"

        lines.append(
            f"| {metric} | {variant} | {cell(row, 'value')} | {cell(row, 'shuffled_queries')} "
            f"| {cell(other, 'value')} | {cell(other, 'shuffled_queries')} |"
        )
    accuracy = "; ".join(
        f"`{p}`: ZSL {a['zsl']:.3f}, ICL {a['icl']:.3f}, FT {a['ft']:.3f} (lr {runs[p].lr:g})"
        for p, a in acc.items()
    )
    flags = [f"`{p}`: {f}" for p, c in runs.items() for f in c.flags]
    text = "\n".join(lines) + f"\n\nAccuracy: {accuracy}."
    if flags:
        text += "\n\n" + "\n".join(f"- {f}" for f in flags)
    return text


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
    page = path.read_text()
    if begin not in page or end not in page:
        sys.exit(f"{path} lacks the markers {begin} ... {end}")
    head, rest = page.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n\n{text}\n\n{end}{tail}")


if __name__ == "__main__":
    code = main(["demo", "--quiet", "--update-readme", str(ROOT / "README.md")])
    if code:
        sys.exit(code)
    replace_between(ROOT / "docs" / "method.md", BEGIN, END, protocol_table())
    print("updated README.md and docs/method.md", file=sys.stderr)
