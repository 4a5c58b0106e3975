"""Causal interventions on what the query reads from the demonstrations (interventions.md).

Every intervention changes only the *query positions*: the demonstrations' own forward is
untouched, so their keys and values are the plain ICL ones (the cached prefix's). Each
batch row of a forward carries its own :class:`Intervention`, so a per-head scan of one
query is one batch.

- **Knockout(H)**: at the query positions, heads in H lose their demonstration keys and
  renormalise over the rest (BOS and the query tokens, within a local layer's window).
  It acts on ``hook_attn_scores``, before the softmax and so before the value multiply:
  the demonstration scores become the dtype's most negative number, the way the model
  masks, and the model's own softmax renormalises.
- **Transplant(H, form)**: Blind (all heads knocked out), and each head in H gets, at
  ``hook_z`` (before ``W_O``), from its *current* query vector q_t and the cached
  demonstration keys/values:

  - ``linear``/``fitted``: ``z_B,t + c_h dW_ICL q_t`` with
    ``dW_ICL q_t = sum_{i in D} v_i (k_i . q_t)`` over the demonstration keys the head
    sees, computed as :func:`icl_lens.study.duality.decompose` computes it (post-QK-norm,
    post-rotary q and k, key/value heads shared by their query-head group, no score
    scale); ``c_h = 1`` for ``linear``.
  - ``softmax``: ``alpha_t z_D,t + (1 - alpha_t) z_B,t``, ``z_D,t`` the softmax over the
    demonstration scores ``scale * q_t . k_i`` alone, ``alpha_t`` their softmax mass
    against the query-side scores of this forward.

ICL, Blind, Restore(H) are knockouts (:func:`icl`, :func:`blind`, :func:`restore`).
:func:`added_update` is Blind with ``z_B,t + U_h q_t`` on the heads in H for given
matrices ``U_h`` (a control: a random matrix of dW_ICL's norm, :meth:`DemoKV.update_norms`).

>>> import icl_lens as il
>>> from icl_lens.hooks.intervention_runner import InterventionRunner
>>> adapter = il.adapt(il.toy_model())                                      # doctest: +SKIP
>>> scan = [knockout(adapter, [(l, h)]) for l, h in all_heads(adapter)]     # doctest: +SKIP
>>> runner = InterventionRunner(adapter, prompt.prefix)                     # doctest: +SKIP
>>> out = runner.run(queries, [icl(adapter), blind(adapter), *scan])        # doctest: +SKIP
>>> out.logits.shape  # [query, intervention, d_vocab]                      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_lens.model.adapter import HookFn, ModelAdapter

__all__ = [
    "DemoKV",
    "Intervention",
    "InterventionHooks",
    "added_update",
    "all_heads",
    "blind",
    "head_mask",
    "icl",
    "knockout",
    "restore",
    "transplant",
]

Heads = Literal["all"] | Bool[Tensor, "layer head"] | Iterable[tuple[int, int]]
Form = Literal["linear", "fitted", "softmax"]


@dataclass(frozen=True, eq=False)
class Intervention:
    """What each head reads from the demonstrations at the query positions.

    ``knockout[l, h]``: the head's demonstration keys are removed (renormalised over the
    rest). ``transplant[l, h]``: the knocked-out output gets a transplant term back:
    ``alpha z_D + (1 - alpha) z_B`` where ``softmax[l, h]``, else ``z_B + scale[l, h]
    dW_ICL q``, plus ``update[l, h] q`` where ``update`` is given (an additive per-head
    matrix term, ``[layer, head, d_head, d_head]``). A transplanted head must be knocked
    out (the term replaces what the knockout removed). Build one with :func:`knockout`,
    :func:`restore`, :func:`transplant`, :func:`added_update`, :func:`icl` or
    :func:`blind`.
    """

    knockout: Bool[Tensor, "layer head"]
    transplant: Bool[Tensor, "layer head"]
    softmax: Bool[Tensor, "layer head"]
    scale: Float[Tensor, "layer head"]
    name: str = ""
    update: Float[Tensor, "layer head d_head d_head"] | None = None

    def __post_init__(self):
        parts = (self.knockout, self.transplant, self.softmax, self.scale)
        shapes = {tuple(x.shape) for x in parts}
        if len(shapes) != 1:
            raise ValueError(f"knockout, transplant, softmax and scale differ in shape: {shapes}")
        if (self.transplant & ~self.knockout).any():
            raise ValueError(
                "a transplanted head must also be knocked out (its term replaces the "
                "demonstrations' share of the output): build it with transplant(...)"
            )
        if (self.softmax & ~self.transplant).any():
            raise ValueError("softmax marks transplanted heads only")
        if not torch.isfinite(self.scale).all():
            raise ValueError("the linear transplant's scales must be finite")
        if self.update is not None:
            u = self.update
            if (
                u.ndim != 4
                or tuple(u.shape[:2]) != tuple(self.knockout.shape)
                or (u.shape[2] != u.shape[3])
            ):
                raise ValueError(
                    f"update must be [n_layers, n_heads, d_head, d_head] "
                    f"({list(self.knockout.shape)} heads); got {list(u.shape)}"
                )
            if not torch.isfinite(u).all():
                raise ValueError("the update matrices must be finite")
            if self.softmax.any():
                raise ValueError("an update adds to the linear form: no softmax heads with it")

    @property
    def linear_scale(self) -> Float[Tensor, "layer head"]:
        """c_h of the linear term per head (0 where a head gets none)."""
        return torch.where(self.transplant & ~self.softmax, self.scale, 0.0)


def all_heads(adapter: ModelAdapter) -> list[tuple[int, int]]:
    """Every ``(layer, head)`` pair, layer-major: the order of a per-head scan."""
    return [(layer, h) for layer in range(adapter.n_layers) for h in range(adapter.n_heads)]


def head_mask(adapter: ModelAdapter, heads: Heads) -> Bool[Tensor, "layer head"]:
    """``heads`` ("all", ``(layer, head)`` pairs, or a bool ``[n_layers, n_heads]``
    tensor) as a bool mask.

    >>> from types import SimpleNamespace
    >>> head_mask(SimpleNamespace(n_layers=2, n_heads=3), [(1, 2)]).int().tolist()
    [[0, 0, 0], [0, 0, 1]]
    """
    shape = (adapter.n_layers, adapter.n_heads)
    if isinstance(heads, str):
        if heads != "all":
            raise ValueError(f'heads must be "all", (layer, head) pairs or a mask; got {heads!r}')
        return torch.ones(shape, dtype=torch.bool)
    if isinstance(heads, Tensor):
        if heads.dtype != torch.bool or tuple(heads.shape) != shape:
            raise ValueError(
                f"a heads mask must be a bool tensor of shape {list(shape)} "
                f"[n_layers, n_heads]; got {heads.dtype} {list(heads.shape)}"
            )
        return heads.detach().cpu().clone()
    mask = torch.zeros(shape, dtype=torch.bool)
    for pair in heads:
        layer, head = (int(x) for x in pair)
        if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
            raise ValueError(
                f"head ({layer}, {head}) is outside the model's {shape[0]} layers x "
                f"{shape[1]} heads"
            )
        mask[layer, head] = True
    return mask


def _label(heads: Bool[Tensor, "layer head"]) -> str:
    if heads.all():
        return "all"
    pairs = heads.nonzero().tolist()
    if len(pairs) > 4:
        return f"{len(pairs)} heads"
    return ",".join(f"L{layer}H{h}" for layer, h in pairs) or "none"


def knockout(adapter: ModelAdapter, heads: Heads) -> Intervention:
    """Knockout(H): heads in H do not read the demonstrations at the query positions."""
    mask = head_mask(adapter, heads)
    none = torch.zeros_like(mask)
    return Intervention(mask, none, none, torch.ones(mask.shape), f"knockout({_label(mask)})")


def icl(adapter: ModelAdapter) -> Intervention:
    """The plain forward: Knockout of no head."""
    return replace(knockout(adapter, []), name="icl")


def blind(adapter: ModelAdapter) -> Intervention:
    """Knockout(all heads, all layers): the query never reads a demonstration."""
    return replace(knockout(adapter, "all"), name="blind")


def restore(adapter: ModelAdapter, heads: Heads) -> Intervention:
    """Restore(H): Blind, except that the heads in H attend normally."""
    mask = head_mask(adapter, heads)
    return replace(knockout(adapter, ~mask), name=f"restore({_label(mask)})")


def transplant(
    adapter: ModelAdapter,
    heads: Heads,
    form: Form = "linear",
    *,
    scales: Float[Tensor, "layer head"] | None = None,
) -> Intervention:
    """Transplant(H, form): Blind, with each head in H given its meta-gradient term.

    ``form="fitted"`` needs ``scales`` (c_h per head, ``[n_layers, n_heads]``; only the
    entries of H are read); ``linear`` is c_h = 1.

    >>> from types import SimpleNamespace
    >>> x = transplant(SimpleNamespace(n_layers=2, n_heads=2), [(0, 1)], "softmax")
    >>> x.name, x.knockout.all().item(), x.transplant.int().tolist()
    ('transplant(L0H1, softmax)', True, [[0, 1], [0, 0]])
    """
    mask = head_mask(adapter, heads)
    if form not in ("linear", "fitted", "softmax"):
        raise ValueError(f'form must be "linear", "fitted" or "softmax"; got {form!r}')
    if (form == "fitted") != (scales is not None):
        raise ValueError('scales (c_h per head) are given with form="fitted", and only with it')
    scale = torch.ones(mask.shape)
    if scales is not None:
        scale = torch.as_tensor(scales, dtype=torch.float32).detach().cpu()
        if tuple(scale.shape) != tuple(mask.shape) or not torch.isfinite(scale).all():
            raise ValueError(
                f"scales must be finite, of shape {list(mask.shape)} [n_layers, n_heads]; "
                f"got {list(scale.shape)}"
            )
    softmax = mask if form == "softmax" else torch.zeros_like(mask)
    full = torch.ones_like(mask)
    return Intervention(full, mask, softmax, scale, f"transplant({_label(mask)}, {form})")


def added_update(
    adapter: ModelAdapter,
    heads: Heads,
    update: Float[Tensor, "layer head d_head d_head"],
    *,
    name: str = "",
) -> Intervention:
    """Blind, and each head in H gets ``z_B,t + update[l, h] q_t`` at the query
    positions (q_t as the linear transplant reads it: post-rotary, no score scale).

    >>> from types import SimpleNamespace
    >>> a = SimpleNamespace(n_layers=1, n_heads=2)
    >>> added_update(a, [(0, 1)], torch.zeros(1, 2, 4, 4)).name
    'update(L0H1)'
    """
    mask = head_mask(adapter, heads)
    full = torch.ones_like(mask)
    update = torch.as_tensor(update, dtype=torch.float32).detach().cpu()
    return Intervention(
        full,
        mask,
        torch.zeros_like(mask),
        torch.zeros(mask.shape),
        name or f"update({_label(mask)})",
        update=update,
    )


@dataclass(frozen=True, eq=False)
class DemoKV:
    """The demonstrations' keys and values (post-QK-norm, post-rotary keys, as the model
    computed them in the ICL prefix), expanded to query heads, per layer."""

    positions: Int[Tensor, " demo"]
    """Key positions of the demonstration tokens (BOS is position 0 of the prefix)."""
    n_prefix: int
    keys: tuple[Float[Tensor, "demo head d_head"], ...]
    values: tuple[Float[Tensor, "demo head d_head"], ...]

    @classmethod
    def from_prefix(
        cls,
        adapter: ModelAdapter,
        k: Sequence[Float[Tensor, "prefix kv_head d_head"]],
        v: Sequence[Float[Tensor, "prefix kv_head d_head"]],
        demo_mask: Bool[Tensor, " prefix"],
    ) -> DemoKV:
        """From the prefix's per-layer k and v (``[prefix, kv_head, d_head]``)."""
        positions = demo_mask.nonzero()[:, 0]
        g = adapter.group_size

        def demo(x: Tensor) -> Tensor:
            x = x[positions.to(x.device)].float()
            return x.repeat_interleave(g, dim=1) if x.shape[1] != adapter.n_heads else x

        return cls(positions, len(demo_mask), tuple(map(demo, k)), tuple(map(demo, v)))

    def update_norms(self) -> Float[Tensor, "layer head"]:
        """Frobenius norm of each head's dW_ICL = sum_i v_i k_i^T over every
        demonstration key (a query that sees only some of them, in a sliding window,
        gets a part of it)."""
        return torch.stack(
            [
                torch.linalg.matrix_norm(torch.einsum("nhd,nhe->hde", v, k))
                for k, v in zip(self.keys, self.values, strict=True)
            ]
        )


class InterventionHooks:
    """The hooks that apply one :class:`Intervention` per batch row.

    ``hooks()`` gives ``(name, fn)`` pairs for ``model.hooks`` (or
    :meth:`PrefixRunner.run`'s ``hooks=``): on a forward of ``prefix + queries`` (a full
    one, or the queries alone after the cached prefix) whose batch rows are
    ``interventions`` in order. Query positions are those at or after ``n_prefix``.
    """

    def __init__(self, adapter: ModelAdapter, interventions: Sequence[Intervention], demo: DemoKV):
        self.adapter, self.demo = adapter, demo
        self.n_rows = len(interventions)
        self.knock = torch.stack([x.knockout for x in interventions])  # row layer head
        self.moved = torch.stack([x.transplant for x in interventions])
        self.soft = torch.stack([x.softmax for x in interventions])
        self.scale = torch.stack([x.linear_scale for x in interventions])
        self.updates = {i: x.update for i, x in enumerate(interventions) if x.update is not None}
        linear = self.moved & ~self.soft
        self.linear_layers = linear.any(-1).any(0).tolist()
        self.softmax_layers = self.soft.any(-1).any(0).tolist()
        rows = self.moved.any(-1)  # row layer
        self.only_softmax = [  # every head of the transplanted rows takes the softmax form
            bool(self.soft[rows[:, layer], layer].all()) and self.softmax_layers[layer]
            for layer in range(adapter.n_layers)
        ]
        self._q: dict[int, Tensor] = {}
        self._rot: dict[tuple[str, int], Tensor] = {}
        self._scores: dict[int, Tensor] = {}
        self._on_device: dict[tuple, Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        a, pairs = self.adapter, []
        for layer in range(a.n_layers):
            moved = bool(self.moved[:, layer].any())
            if moved:
                pairs.append((a.name(layer, "q"), self._keep_q(layer)))
                if a.manual_rotary:
                    for what in ("cos", "sin"):
                        pairs.append((a.name(layer, what), self._keep_rot(what, layer)))
            if moved or bool(self.knock[:, layer].any()):
                pairs.append((a.name(layer, "scores"), self._on_scores(layer, moved)))
            if moved:
                pairs.append((a.name(layer, "z"), self._on_z(layer)))
        return pairs

    def _plan(self, what: str, layer: int, device) -> Tensor:
        """Per-layer tensors of the plan, moved to the layer's device once (a runner
        reuses the hooks for every batch of the same interventions)."""
        key = (what, layer)
        if key not in self._on_device:
            rows = self.moved[:, layer].any(-1).nonzero()[:, 0]
            added = [r for r in rows.tolist() if r in self.updates]
            table = {
                "rows": lambda: rows,
                "scale": lambda: self.scale[rows, layer][:, None, :, None],  # row 1 head 1
                "soft": lambda: self.soft[rows, layer][:, None, :, None],
                "demo": lambda: self.demo.positions,
                # the rows with an update term: their index among ``rows``, their matrices
                # (zero on the heads the row does not transplant)
                "added": lambda: torch.tensor([rows.tolist().index(r) for r in added]),
                "update": lambda: (
                    torch.stack(
                        [
                            self.updates[r][layer] * self.moved[r, layer][:, None, None]
                            for r in added
                        ]
                    )
                    if added
                    else torch.zeros(0)
                ),
            }
            self._on_device[key] = table[what]().to(device)
        return self._on_device[key]

    def _cut(self, layer: int, shape: torch.Size, first: int, device) -> Tensor:
        """Where a knockout masks the scores: the knocked-out heads' demonstration keys,
        from the query rows (``first`` on); one mask per batch shape."""
        key = ("cut", layer, tuple(shape), first)
        if key not in self._on_device:
            batch, heads, n_rows, n_keys = shape
            cut = torch.zeros(batch, heads, 1, n_keys, dtype=torch.bool)
            cut[..., self.demo.positions] = self.knock[:, layer, :, None, None]
            if first:
                cut = cut & (torch.arange(n_rows) >= first)[None, None, :, None]
            self._on_device[key] = cut.to(device)
        return self._on_device[key]

    # ---- hooks ------------------------------------------------------------------
    def _keep_q(self, layer: int):
        def hook(q: Tensor, hook=None) -> None:
            self._q[layer] = q

        return hook

    def _keep_rot(self, what: str, layer: int):
        def hook(x: Tensor, hook=None) -> None:
            self._rot[what, layer] = x if x.ndim == 3 else x[None]

        return hook

    def _on_scores(self, layer: int, keep: bool):
        knocks = bool(self.knock[:, layer].any())

        def hook(scores: Tensor, hook=None) -> Tensor | None:
            if scores.shape[0] != self.n_rows:
                raise RuntimeError(
                    f"hook_attn_scores of layer {layer} has a batch of {scores.shape[0]} rows "
                    f"but the hooks were built for {self.n_rows} interventions: one "
                    "intervention per batch row"
                )
            n_rows, n_keys = scores.shape[-2:]
            first = max(0, self.demo.n_prefix - (n_keys - n_rows))  # first query row
            if keep:
                self._scores[layer] = scores[:, :, first:]
            if not knocks:
                return None
            cut = self._cut(layer, scores.shape, first, scores.device)
            return scores.masked_fill(cut, torch.finfo(scores.dtype).min)

        return hook

    def _on_z(self, layer: int):
        def hook(z: Tensor, hook=None) -> Tensor:
            scores, q = self._scores.pop(layer), self._q.pop(layer)
            rows = self._plan("rows", layer, z.device)
            first = z.shape[1] - scores.shape[2]
            q = q[rows, first:]
            if self.adapter.manual_rotary:
                cos, sin = self._rot.pop(("cos", layer)), self._rot.pop(("sin", layer))
                cos, sin = cos[:, first:], sin[:, first:]
                if cos.shape[0] != 1:
                    cos, sin = cos[rows], sin[rows]
                n = q.shape[0]
                q = self.adapter.rotate(q, cos.expand(n, -1, -1), sin.expand(n, -1, -1))
            out = z.clone()
            new = self._transplanted(layer, z[rows, first:], q, scores[rows])
            out[rows, first:] = new.to(z.dtype)
            return out

        return hook

    # ---- the terms ----------------------------------------------------------------
    def _transplanted(
        self,
        layer: int,
        z: Float[Tensor, "row pos head d_head"],
        q: Float[Tensor, "row pos head d_head"],
        scores: Float[Tensor, "row head pos key"],
    ) -> Float[Tensor, "row pos head d_head"]:
        """The head outputs of the transplanted rows with their terms (z is Blind's)."""
        device = z.device
        k, v = self.demo.keys[layer], self.demo.values[layer]
        cols = self._plan("demo", layer, device)
        demo_scores = scores[..., cols]
        # the demonstration keys each head sees from each position, as the model masked
        # them (-inf on TransformerLens 3, the dtype's most negative number on the bridge)
        visible = demo_scores > torch.finfo(scores.dtype).min / 2  # row head pos demo
        key_dot_query = torch.einsum("rthd,nhd->rhtn", q.float(), k) * visible
        zf = out = z.float()
        if self.linear_layers[layer]:
            linear = torch.einsum("rhtn,nhd->rthd", key_dot_query, v)
            out = zf + self._plan("scale", layer, device) * linear
            added = self._plan("added", layer, device)
            if len(added):
                update = self._plan("update", layer, device)  # added head d e
                term = torch.einsum("ahde,athe->athd", update, q[added].float())
                out = out.index_add(0, added, term)
        if self.softmax_layers[layer]:
            # the softmax over the model's own query-side scores and, on the demonstration
            # keys, scale * q . k: its demonstration weights are alpha softmax_D
            s_demo = self.adapter.score_scale(layer) * key_dot_query
            s_demo = s_demo.masked_fill(~visible, float("-inf"))
            every = scores.float().index_copy(-1, cols, s_demo)
            weights = torch.exp(s_demo - torch.logsumexp(every, -1, keepdim=True))
            alpha = weights.sum(-1).transpose(1, 2)[..., None]  # row pos head 1
            mixed = zf * (1 - alpha) + torch.einsum("rhtn,nhd->rthd", weights, v)
            soft = self._plan("soft", layer, device)
            out = mixed if self.only_softmax[layer] else torch.where(soft, mixed, out)
        return out
