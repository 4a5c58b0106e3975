"""Taps on the key/value projections: their inputs x_t and output gradients.

The FT baseline records them to check the dual form of method.md section 2: the
finetuned projection equals the original plus linear attention over the training
tokens, with errors e_t = -lr dL/d(W x_t).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.model.adapter import ModelAdapter, adapt

__all__ = ["KVTaps", "kv_inputs"]


class KVTaps:
    """Record the inputs and output gradients of the K/V projections of one forward.

    TransformerBridge: the projections are ``nn.Linear`` modules (``attn.k``/``attn.v``)
    whose input and output are on the autograd path. HookedTransformer: the input is the
    ``ln1`` output and the outputs are ``hook_k``/``hook_v``.
    """

    def __init__(self, adapter: ModelAdapter, model):
        self.adapter, self.model = adapter, model
        self.inputs: dict[int, Tensor] = {}
        self.grads: dict[tuple[str, int], Tensor] = {}
        self._handles: list = []

    def _keep_grad(self, what: str, layer: int, y: Tensor) -> None:
        if y.requires_grad:
            y.register_hook(lambda g: self.grads.__setitem__((what, layer), g.detach()))

    def __enter__(self):
        for layer in range(self.adapter.n_layers):
            attn = self.model.blocks[layer].attn
            if self.adapter.line == "bridge":
                for what in ("k", "v"):
                    mod = getattr(attn, what)._original_component

                    def fwd(m, inp, out, what=what, layer=layer):
                        self.inputs[layer] = inp[0].detach()
                        self._keep_grad(what, layer, out)

                    self._handles.append(mod.register_forward_hook(fwd))
            else:
                ln = self.model.blocks[layer].ln1

                def ln_fwd(m, inp, out, layer=layer):
                    self.inputs[layer] = out.detach()

                self._handles.append(ln.register_forward_hook(ln_fwd))
        return self

    def hooks(self) -> list:
        if self.adapter.line == "bridge":
            return []
        pairs = []
        for layer in range(self.adapter.n_layers):
            for what in ("k", "v"):

                def hook(y, hook=None, what=what, layer=layer):
                    self._keep_grad(what, layer, y)

                pairs.append((f"blocks.{layer}.attn.hook_{what}", hook))
        return pairs

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def step_record(self, lr: float) -> tuple[Tensor, Tensor, Tensor]:
        n, kv, d = self.adapter.n_layers, self.adapter.n_kv_heads, self.adapter.d_head
        inputs = torch.stack([self.inputs[la][0].cpu() for la in range(n)])
        errs = []
        for what in ("k", "v"):
            g = [self.grads[what, la][0].reshape(-1, kv, d).cpu() for la in range(n)]
            errs.append(-lr * torch.stack(g))
        return inputs, errs[0], errs[1]


def kv_inputs(model, tokens: Int[Tensor, " pos"]) -> Float[Tensor, "layer pos d_model"]:
    """The inputs x of every layer's key/value projections for ``tokens`` (the x of the
    dual form, e.g. to evaluate :meth:`FinetuneResult.dual_update` at a query).

    >>> from tests.models import make_model
    >>> model, _ = make_model("gpt2", n_layers=1)
    >>> kv_inputs(model, torch.tensor([1, 4, 5])).shape
    torch.Size([1, 3, 32])
    """
    adapter = adapt(model)
    taps = KVTaps(adapter, model)
    with adapter.inference(), taps:
        adapter.forward(tokens[None].long().to(adapter.device), fwd_hooks=taps.hooks())
    return torch.stack([taps.inputs[layer][0].cpu() for layer in range(adapter.n_layers)])
