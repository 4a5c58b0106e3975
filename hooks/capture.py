"""Hook functions that keep only what an analysis asks for, at the positions it asks for.

Unlike ``run_with_cache`` nothing else is stored: per-position quantities (q, z, scores,
pattern, attn_out) are gathered at the chosen query positions inside the hook, and only
k, v (needed for every key position) are kept whole.

>>> import icl_lens as il
>>> from icl_lens.hooks import Capture
>>> model = il.toy_model()                                             # doctest: +SKIP
>>> cap = Capture(il.adapt(model), what={"attn_out", "pattern"})       # doctest: +SKIP
>>> logits = cap.run(tokens, positions=torch.tensor([[5]]))           # doctest: +SKIP
>>> cap.values["pattern", 0].shape   # [batch, n_positions, head, key_pos]   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.model.adapter import ModelAdapter

PER_POSITION = ("q", "z", "scores", "pattern", "attn_out")
WHOLE = ("k", "v")
ALL = frozenset(PER_POSITION + WHOLE)


def gather_positions(x: Tensor, positions: Int[Tensor, "batch n_pos"], *, pos_dim: int) -> Tensor:
    """``x[b, ..., positions[b, j], ...]`` moved to ``[batch, n_pos, ...]``."""
    x = x.movedim(pos_dim, 1)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, positions.to(x.device)]


@dataclass
class Capture:
    """Collects per-layer attention quantities during one forward.

    ``values[(what, layer)]`` after :meth:`run`, with shapes
    q, z: ``[batch, n_pos, head, d_head]``; k, v: ``[batch, pos, kv_head, d_head]``;
    scores, pattern: ``[batch, n_pos, head, key_pos]``; attn_out: ``[batch, n_pos, d_model]``.
    q and k are post-rotary on rotary models; scores are ``-inf`` at every key the model
    masked (:meth:`~icl_lens.model.adapter.ModelAdapter.masked_as_neginf`).
    """

    adapter: ModelAdapter
    what: Iterable[str] = ALL
    layers: Iterable[int] | None = None
    values: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.what = frozenset(self.what)
        unknown = self.what - ALL
        if unknown:
            raise ValueError(
                f"unknown capture targets {sorted(unknown)}; choose from {sorted(ALL)}"
            )
        n = self.adapter.n_layers
        self.layers = tuple(range(n) if self.layers is None else self.layers)
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n} layers")

    def hooks(self, positions: Int[Tensor, "batch n_pos"] | None) -> list:
        """(hook name, function) pairs for ``model.hooks`` / ``run_with_hooks``."""
        a = self.adapter
        rotate = a.manual_rotary and self.what & {"q", "k"}
        pairs = []
        for layer in self.layers:
            for what in self.what:
                pairs.append((a.name(layer, what), self._hook(what, layer, positions, rotate)))
            if rotate:
                for what in ("cos", "sin"):
                    pairs.append((a.name(layer, what), self._hook(what, layer, None, False)))
        return pairs

    def _hook(self, what: str, layer: int, positions, rotate: bool):
        store = self.values

        def hook(x: Tensor, hook=None):
            x = x.detach()
            if what == "scores":  # masked keys at -inf, read from the model's mask
                x = self.adapter.masked_as_neginf(layer, x)
            if what in ("cos", "sin") and x.ndim == 2:
                x = x[None]
            if what in PER_POSITION and positions is not None and not (rotate and what == "q"):
                pos_dim = 2 if what in ("scores", "pattern") else 1
                x = gather_positions(x, positions, pos_dim=pos_dim)
                if what in ("scores", "pattern"):
                    x = x.contiguous()
            store[what, layer] = x

        return hook

    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        *,
        positions: Int[Tensor, "batch n_pos"] | None = None,
        hooks: Iterable[tuple[str, Any]] = (),
        **forward_kwargs,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Forward ``tokens`` once and fill :attr:`values`; returns the logits.

        ``hooks``: more ``(name, fn)`` pairs for this forward, run after the capture's
        at a hook point they share: the capture keeps what the model computed there
        before they change it (an intervention's knockout of the attention scores)."""
        self.values.clear()
        fwd_hooks = self.hooks(positions) + list(hooks)
        logits = self.adapter.forward(tokens, fwd_hooks=fwd_hooks, **forward_kwargs)
        self._finish_rotary(positions)
        return logits

    def _finish_rotary(self, positions) -> None:
        """Bridge models without hook_rot_q/k: rotate with the model's own cos/sin."""
        if not (self.adapter.manual_rotary and self.what & {"q", "k"}):
            return
        for layer in self.layers:
            cos, sin = self.values.pop(("cos", layer)), self.values.pop(("sin", layer))
            for what in ("q", "k"):
                if (what, layer) not in self.values:
                    continue
                x = self.values[what, layer]
                c, s = cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1)
                x = self.adapter.rotate(x, c, s)
                if what == "q" and positions is not None:
                    x = gather_positions(x, positions, pos_dim=1)
                self.values[what, layer] = x
