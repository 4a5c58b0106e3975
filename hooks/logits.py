"""Logits only where they are read: a hook on the unembedding's input.

The unembedding of a GPT-2-sized vocabulary costs about a third of a forward, and the
prefix positions of an ICL prompt never need it.
"""

from __future__ import annotations

from icl_lens.hooks.capture import gather_positions
from jaxtyping import Int
from torch import Tensor

UNEMBED_IN = "unembed.hook_in"


def logit_hook(positions: Int[Tensor, "batch n_pos"] | None, *, last: bool = False):
    """``(unembed.hook_in, fn)`` that keeps only the residual rows at ``positions`` (or
    the last row), so the unembedding runs for those alone; ``None`` when every
    position is wanted."""
    if positions is None and not last:
        return None

    def keep(x: Tensor, hook=None) -> Tensor:
        if last:
            return x[:, -1:]
        return gather_positions(x, positions, pos_dim=1)

    return (UNEMBED_IN, keep)
