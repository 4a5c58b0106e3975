"""Deep copies of hooked models that really are independent of the original.

>>> from tests.models import make_model
>>> model, _ = make_model("gpt2", n_layers=1)
>>> clone = copy_model(model)
>>> clone is not model and clone.tokenizer is model.tokenizer
True
"""

from __future__ import annotations

import copy

__all__ = ["copy_model"]


def copy_model(model):
    """A deep copy sharing the (read-only) tokenizer.

    TransformerBridge (TransformerLens 4.3) blocks install forward pre-hooks whose
    closures hold a weak proxy to *their* attention module; ``copy.deepcopy`` copies the
    hook functions as they are, so the copy's forward would write its activations (with
    their autograd graph) into the original model. The copy's hooks are re-installed so
    that they point at the copy.
    """
    tok = getattr(model, "tokenizer", None)
    memo = {id(tok): tok} if tok is not None else {}
    clone = copy.deepcopy(model, memo)
    for block in getattr(clone, "blocks", ()):
        if hasattr(block, "_teardown_capture_hooks") and hasattr(
            block, "_maybe_wire_capture_hooks"
        ):
            block._teardown_capture_hooks()  # the copied handles point at the copy's dicts
            block._maybe_wire_capture_hooks()
    return clone
