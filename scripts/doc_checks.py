"""Checks that a document quotes only what its numbers say (scripts/study_tables.py,
scripts/intervention_study.py).

A table block sits between two marker lines and is written by a script from a numbers
file beside the document. Below it, the reading: every number in its prose must either
be checked, ``<!-- check: QUOTE = EXPRESSION; ... -->`` (QUOTE as the text writes it,
EXPRESSION over the numbers, equal once rounded to QUOTE's decimals), or declared a
setting, ``<!-- given: 16 (shots), 512 (the local layers' window) -->``, in the same
paragraph. Numbers in code, links and scientific notation are not prose.

>>> check_reading("ICL gains 4.7 points. <!-- check: 4.7 = 79.7 - 75.0 -->", {})
[]
>>> check_reading("ICL gains 5 points.", {})
["'5' is neither checked nor given in: 'ICL gains 5 points.'"]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

from icl_lens.files import atomic_write_text

CHECK = re.compile(r"<!-- check: (.+?) -->", re.S)
GIVEN = re.compile(r"<!-- given: (.+?) -->", re.S)
NUMBER = re.compile(  # signed, with thousands separators; not in names (SST-2, 1.3B)
    r"(?:(?<![\w.)\]])-)?(?<![\w.])(?<![A-Za-z]-)"
    r"(?:\d{1,3}(?:,\d{3})+(?![\w,])|\d+(?:\.\d+)?(?!\w|\.\w))"
)
FENCE = re.compile(r"```.*?```", re.S)
NOT_PROSE = re.compile(r"<!--.*?-->|`[^`]*`|\]\([^)]*\)|\d+(?:\.\d+)?e-?\d+", re.S)
BUILTINS = {f.__name__: f for f in (min, max, sum, len, sorted, abs, round, any, all, zip)}
HELPERS = {"pct": lambda x: 100 * x, "mean": fmean}


def table_block(text: str, doc: Path | str, begin: str, end: str) -> tuple[int, int]:
    """Where the block between the marker lines ``begin`` and ``end`` starts and ends."""
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no table block: the lines {begin!r} and {end!r}")
    return text.index(begin) + len(begin), text.index(end)


def _decimals(quote: str) -> int:
    return len(quote.split(".")[1]) if "." in quote else 0


def check_reading(reading: str, env: dict[str, Any]) -> list[str]:
    """What in ``reading`` the expressions over ``env`` do not bear out (empty: all)."""
    env = {"__builtins__": BUILTINS, **HELPERS, **env}
    problems = []
    reading = FENCE.sub(" ", reading.replace("\u2212", "-"))  # code blocks span paragraphs
    for paragraph in re.split(r"\n\s*\n", reading):
        checked = set()
        for match in CHECK.findall(paragraph):
            for part in match.split(";"):
                quote, expression = (x.strip() for x in part.split("=", 1))
                checked.add(quote)
                try:
                    value = float(eval(expression, env))  # the document's own expressions
                except Exception as err:  # noqa: BLE001 - any failure is the check's answer
                    problems.append(f"{quote} = {expression}: {type(err).__name__}: {err}")
                    continue
                wanted = float(quote.replace(",", ""))
                tolerance = 0.5 * 10 ** -_decimals(quote) + 1e-9
                if not math.isclose(value, wanted, rel_tol=0, abs_tol=tolerance):
                    problems.append(f"{quote} = {expression}: the numbers give {value:.6g}")
        for given in GIVEN.findall(paragraph):
            checked |= set(NUMBER.findall(re.sub(r"\([^)]*\)", "", given)))
        prose = NOT_PROSE.sub(" ", paragraph)
        for number in NUMBER.findall(prose):
            if number not in checked:
                problems.append(f"{number!r} is neither checked nor given in: {prose[:80]!r}")
    return problems


def numbers_path(doc: Path) -> Path:
    """Where ``doc``'s numbers are stored: ``NAME-numbers.json`` beside it."""
    return doc.with_name(doc.stem + "-numbers.json")


def write_doc(doc: Path, data: dict, render: Callable[[dict], str], begin: str, end: str):
    """Store ``data`` beside ``doc`` (in its order) and rewrite the table block from it."""
    text = doc.read_text()
    start, stop = table_block(text, doc, begin, end)
    atomic_write_text(numbers_path(doc), json.dumps(data, indent=1) + "\n")
    atomic_write_text(doc, text[:start] + "\n" + render(data) + "\n" + text[stop:])


def check_doc(
    doc: Path,
    render: Callable[[dict], str],
    namespace: Callable[[dict], dict[str, Any]],
    begin: str,
    end: str,
) -> list[str]:
    """What in ``doc`` its numbers do not bear out (empty: all of it): a table block they
    no longer render, and the reading below it (to the next ``## `` heading)."""
    text = doc.read_text()
    data = json.loads(numbers_path(doc).read_text())
    start, stop = table_block(text, doc, begin, end)
    problems = []
    if text[start:stop].strip() != render(data).strip():
        problems.append("the table block is not what the numbers render: write it again")
    return problems + check_reading(text[stop:].split("\n## ")[0], namespace(data))
