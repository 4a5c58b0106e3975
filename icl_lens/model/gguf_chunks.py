"""GGUF chunks: in which order they join, and whether the joined bytes are one GGUF file.

A GGUF checkpoint split into byte chunks (``m.gguf.part00``, ``m.gguf.part01``, ...) is
only the right model when the chunks are joined first to last, each once. The names say
the order: :func:`chunk_order` sorts chunks by the number that tells their names apart
(``part2`` before ``part10``, whatever order a shell glob gave), keeps chunks without
such a number in the order given only when that is their names' order, and refuses the
rest (a chunk given twice, two chunks with one number, an order the names cannot tell).
:func:`check_layout` then reads the joined file's header with ``gguf.GGUFReader`` (a
memory map: no tensor is read) and refuses a file whose header does not place every
tensor inside it, none overlapping, with the file ending where the last tensor does: a
cut, missing, repeated or foreign chunk.

>>> from pathlib import Path
>>> [p.name for p in chunk_order([Path("m.part1"), Path("m.part10"), Path("m.part2")])]
['m.part1', 'm.part2', 'm.part10']
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

__all__ = ["check_layout", "chunk_order"]

_DIGITS = re.compile(r"(\d+)")
EACH_ONCE = "pass every chunk once, first to last"


def _natural_key(name: str) -> list:
    """``"m.part10"`` -> ``["m.part", 10, ""]``: numbers compare as numbers."""
    return [int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(name))]


def _chunk_numbers(names: list[str]) -> list[int] | None:
    """The number that tells the names apart (``m.gguf.part07`` -> 7), when the names
    differ in exactly one run of digits and nowhere else; else ``None``."""
    parts = [_DIGITS.split(name) for name in names]
    if len({len(p) for p in parts}) != 1:
        return None
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1 or differ[0] % 2 == 0:  # odd positions hold the digit runs
        return None
    numbers = [int(p[differ[0]]) for p in parts]
    same = [n for n, count in Counter(numbers).items() if count > 1]
    if same:
        clash = [name for name, n in zip(names, numbers, strict=True) if n == same[0]]
        raise ValueError(
            f"GGUF chunks {' and '.join(clash)} carry the same number, so their order is "
            f"ambiguous: {EACH_ONCE}"
        )
    return numbers


def chunk_order(files: list[Path]) -> list[Path]:
    """``files`` first to last (see the module docstring); ``ValueError`` naming the
    chunks when the order cannot be told or a chunk is given twice.

    >>> [p.name for p in chunk_order([Path("m.part00"), Path("m.part02"), Path("m.part01")])]
    ['m.part00', 'm.part01', 'm.part02']
    """
    if len(files) < 2:
        return files
    counts = Counter(os.path.realpath(p) for p in files)
    repeated = [p for p in files if counts[os.path.realpath(p)] > 1]
    if repeated:
        raise ValueError(f"GGUF chunk {repeated[0]} is given twice: {EACH_ONCE}")
    names = [p.name for p in files]
    same_name = [n for n, count in Counter(names).items() if count > 1]
    if same_name:
        raise ValueError(
            f"several GGUF chunks are named {same_name[0]}, so their order is ambiguous: "
            f"rename them with their numbers (m.gguf.part00, m.gguf.part01, ...) and {EACH_ONCE}"
        )
    numbers = _chunk_numbers(names)
    if numbers is not None:
        return [p for _, p in sorted(zip(numbers, files, strict=True), key=lambda x: x[0])]
    if names != sorted(names, key=_natural_key):
        raise ValueError(
            f"cannot tell the order of the GGUF chunks {', '.join(names)}: no number tells "
            "their names apart and they are not given in their names' order; rename them "
            f"with their numbers (m.gguf.part00, m.gguf.part01, ...) and {EACH_ONCE}"
        )
    return files


def check_layout(path: Path, shown: str) -> None:
    """Refuse ``path`` (described to the user as ``shown``) unless it is one well-formed
    GGUF file: ``gguf.GGUFReader`` reads its header and tensor table, every tensor lies
    inside the file, none overlaps another, and the file ends with the last tensor (and
    its alignment padding). Reading Gemma 3 270M's header (a 262k-token vocabulary) takes
    16 to 19 s, once per conversion; the tensor data is memory-mapped, not read."""
    from gguf import GGUFReader

    size = path.stat().st_size
    damaged = f"{shown} ({size:,} bytes) is not a well-formed GGUF file"
    fix = f"it is cut short or damaged, or a chunk is missing: {EACH_ONCE}, or download it again"
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - the reader fails in numpy on a short or bad header
        raise ValueError(
            f"{damaged}: its header and tensor table cannot be read ({type(err).__name__}: "
            f"{err}); {fix}"
        ) from None
    end, previous = int(reader.data_offset), "the header"
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        start = int(tensor.data_offset)
        if start < end:
            raise ValueError(
                f"{damaged}: its header places tensor {tensor.name} at byte {start:,}, "
                f"inside {previous}; {fix}"
            )
        end, previous = start + int(tensor.n_bytes), f"tensor {tensor.name}"
    if size >= end + int(reader.alignment):  # past the end: the reader has failed above
        raise ValueError(
            f"{damaged}: its header says the tensors end at byte {end:,}, yet the file goes "
            f"on for {size - end:,} bytes more: a chunk is repeated or does not belong; {EACH_ONCE}"
        )
