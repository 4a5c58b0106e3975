"""docs/real-models.md and docs/interventions.md say only what their tables show: each
table block is what the stored numbers render, and every number the reading quotes is
checked against them (scripts/doc_checks.py) or declared a setting (``<!-- given: -->``)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "real-models.md"


@pytest.fixture(scope="module")
def tables():
    sys.path.insert(0, str(ROOT / "scripts"))  # study_tables imports doc_checks beside it
    spec = importlib.util.spec_from_file_location(
        "study_tables", ROOT / "scripts" / "study_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_models_doc_quotes_only_what_its_numbers_say(tables):
    assert tables.check(DOC) == []


def test_the_interventions_doc_quotes_only_what_its_numbers_say():
    spec = importlib.util.spec_from_file_location(
        "intervention_study", ROOT / "scripts" / "intervention_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.check_interventions_doc(ROOT / "docs" / "interventions.md") == []


def _row(metric, variant, mean, baseline="none", **rest):
    row = dict.fromkeys(["std", "min", "max", "ci_low", "ci_high", "n_sets", "flag"])
    return {"task": "mr", "protocol": "prediction", "metric": metric, "variant": variant,
            "baseline": baseline, "mean": mean, "n": 3, "eligible": "", **row, **rest}  # fmt: skip


NUMBERS = {
    "overall": [
        _row("accuracy", "zsl", 0.75),
        _row("accuracy", "icl", 0.796875),
        _row("accuracy", "ft", 0.77),
        _row("kendall", "tau_b", 0.127, std=0.01, ci_low=0.1, ci_high=0.15, flag="1 set"),
        _row("kendall", "tau_b", 0.125, baseline="shuffled_queries"),
    ],
    "cells": [
        {"seed": s, "task": "mr", "protocol": "prediction", "lr": lr}
        for s, lr in ((1, 1e-4), (2, 1e-5), (3, 1e-4))
    ],  # fmt: skip
}


def _doc(tmp_path, tables, reading: str, numbers=NUMBERS) -> Path:
    doc = tmp_path / "real.md"
    (tmp_path / "real-numbers.json").write_text(json.dumps(numbers))
    block = tables.render(numbers)
    doc.write_text(
        f"# Study\n\n{tables.BEGIN}\n{block}\n{tables.END}\n\n{reading}\n\n## Next\n9.9\n"
    )
    return doc


GOOD = (
    "- ICL 75.0% -> 79.7% on MR, Kendall 0.127 (0.125 for another query) with 16\n"
    "  demonstrations; the smallest rate won in 1 of 3 sets.\n"
    '  <!-- check: 75.0 = pct(v("mr", "prediction", "accuracy", "zsl"));\n'
    '  79.7 = pct(v("mr", "prediction", "accuracy", "icl"));\n'
    '  0.127 = v("mr", "prediction", "kendall", "tau_b");\n'
    '  0.125 = v("mr", "prediction", "kendall", "tau_b", "shuffled_queries");\n'
    '  1 = sum(c["lr"] == 1e-5 for c in sets(task="mr")); 3 = len(sets(task="mr")) -->\n'
    "  <!-- given: 16 (demonstrations per set) -->"
)


def test_a_reading_that_its_numbers_bear_out_passes(tables, tmp_path):
    assert tables.check(_doc(tmp_path, tables, GOOD)) == []
    assert tables.main(["--check", str(_doc(tmp_path, tables, GOOD))]) == 0


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (("79.7%", "80.7%"), r"'80.7' is neither checked nor given"),
        (("79.7 = pct", "79.9 = pct"), r"79.9 = pct.*the numbers give 79.6875"),
        (("0.125 = v", "0.126 = v"), r"0.126 = .*the numbers give 0.125"),
        (("given: 16", "given: 32"), r"'16' is neither checked nor given"),
        (('"tau_b");', '"tau_c");'), r"KeyError: .*0 rows for mr/prediction/kendall/tau_c"),
        (("1 = sum", "2 = sum"), r"2 = sum.*the numbers give 1"),
    ],
)
def test_a_reading_that_says_more_than_its_numbers_fails(tables, tmp_path, edit, problem):
    doc = _doc(tmp_path, tables, GOOD.replace(*edit))
    problems = tables.check(doc)
    assert any(re.search(problem, p) for p in problems), problems
    assert tables.main(["--check", str(doc)]) == 1


def test_tables_the_numbers_no_longer_render_fail(tables, tmp_path):
    doc = _doc(tmp_path, tables, GOOD)
    doc.write_text(doc.read_text().replace("75.0 / 79.7 / 77.0", "75.0 / 80.0 / 77.0"))
    assert tables.check(doc) == ["the table block is not what the numbers render: write it again"]


def test_the_flag_column_names_each_flag_under_the_table(tables):
    text = tables.render(NUMBERS)
    assert "| Kendall tau-b | prediction | 0.127 ± 0.010 [0.100, 0.150] | 0.125 |" in text
    assert text.count("[1]") == 2 and "[1] 1 set" in text


def test_signs_ranges_and_separators_are_read_as_written(tables):
    from doc_checks import check_reading

    text = "From -0.07 to 0.89-0.94, \u22120.5 and 2,000 queries at 1e-4 in `k=32`."
    checks = "<!-- check: -0.07 = -0.071; 0.89 = 0.891; 0.94 = 0.94; -0.5 = -0.5; 2,000 = 2000 -->"
    assert check_reading(f"{text} {checks}", {}) == []
    assert check_reading("Names are not numbers: SST-2, GPT 1.3B, top-5, L2H1, Q4_K_M.", {}) == []
    problems = check_reading(text.replace("-0.07", "0.07") + " " + checks, {})
    assert len(problems) == 1 and problems[0].startswith("'0.07' is neither checked nor given")


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    return text[text.index(heading) :].split("\n", 1)[1].split("\n## ")[0]  # below it


def test_the_readme_quotes_only_what_the_studies_numbers_say(tables):
    """The README's summaries of both studies, checked like the docs they summarise."""
    from doc_checks import check_reading

    real = json.loads((ROOT / "docs" / "real-models-numbers.json").read_text())
    section = _section(ROOT / "README.md", "## On a real model, offline")
    assert check_reading(section, tables.namespace(real)) == []

    interventions = json.loads((ROOT / "docs" / "interventions-numbers.json").read_text())
    study = importlib.util.spec_from_file_location(
        "intervention_study", ROOT / "scripts" / "intervention_study.py"
    )
    module = importlib.util.module_from_spec(study)
    study.loader.exec_module(module)
    section = _section(ROOT / "README.md", "## Do those heads carry ICL's effect?")
    assert check_reading(section, module.namespace(interventions)) == []
