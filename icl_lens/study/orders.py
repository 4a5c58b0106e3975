"""Demonstration orders and token alignment, for the test-retest ceilings.

ICL vs ICL with the same demonstrations in another order, and FT vs FT trained in
another order, compare token scores token by token: a score recorded in the other order
has to be put back at the position its token has in the first order. Every demonstration
is tokenized on its own (:func:`icl_lens.data.prompts.build_prompt`), so reordering
permutes whole blocks of tokens.

>>> other_order(4, seed=0)
[2, 1, 0, 3]
>>> block_index([2, 1, 3], [2, 0, 1]).tolist()   # blocks A(2) B(1) C(3) stored as C A B
[3, 4, 5, 0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from icl_lens.data.prompts import Prompt

__all__ = ["block_index", "block_lengths", "kept_columns", "other_order"]


def other_order(k: int, *, seed: int) -> list[int]:
    """A seeded permutation of ``range(k)`` that is not the identity (``k >= 2``)."""
    if k < 2:
        raise ValueError(f"another order needs at least 2 demonstrations, got {k}")
    order = np.random.default_rng([int(seed), k]).permutation(k)
    if (order == np.arange(k)).all():
        order = np.roll(order, 1)
    return [int(i) for i in order]


def block_index(lengths: Sequence[int], order: Sequence[int]) -> Int[Tensor, " token"]:
    """For blocks of ``lengths`` (in the first order) stored in ``order`` (``order[j]`` is
    the block at place j), the index of each token of the first order in the storage:
    ``stored[..., block_index(lengths, order)]`` puts a token axis back in the first order."""
    if sorted(order) != list(range(len(lengths))):
        raise ValueError(f"order {list(order)} is not a permutation of {len(lengths)} blocks")
    start, offset = {}, 0
    for block in order:
        start[block] = offset
        offset += lengths[block]
    parts = [torch.arange(start[b], start[b] + lengths[b]) for b in range(len(lengths))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def block_lengths(prompt: Prompt, *, separators: bool = True) -> list[int]:
    """Tokens per demonstration of ``prompt``, with or without its separator."""
    spans = prompt.demo_spans if separators else prompt.content_spans()
    return [end - start for start, end in spans]


def kept_columns(prompt: Prompt, *, separators: bool = True) -> Int[Tensor, " token"] | None:
    """Columns of the demonstration-token axis (0 = the token after BOS) that FT trains
    on: all of them with separators (None), else each demonstration's own tokens, the
    authors' slice that skips the separator after every demonstration."""
    if separators:
        return None
    return torch.cat([torch.arange(s - 1, e - 1) for s, e in prompt.content_spans()])
