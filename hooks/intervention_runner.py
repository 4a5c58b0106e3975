"""Logits at the prediction position for every (query, intervention), on the cached prefix.

The demonstrations run once (:class:`~icl_lens.hooks.prefix.PrefixRunner`'s cache, checked
against a full forward); their keys and values for the transplant terms are read from
that same prefix forward. Every (query, intervention) pair is one batch row, query-major,
so the interventions of one query share a batch: a per-head scan of a query is
``n_layers * n_heads`` rows of one forward.

>>> from tests.models import make_model, make_tokenizer
>>> import icl_lens as il
>>> from icl_lens.hooks import interventions as iv
>>> model, _ = make_model("llama")
>>> tok = make_tokenizer()
>>> prompt = il.build_prompt(tok, ["w1 good", "w2 bad"], "w3", separator=" \\n")
>>> a = il.adapt(model)
>>> runner = InterventionRunner(a, prompt.prefix, demo_mask=prompt.demo_mask[: prompt.query_start])
>>> out = runner.run([prompt.tokens[prompt.query_start :]], [iv.icl(a), iv.blind(a)])
>>> out.logits.shape, out.names
(torch.Size([1, 2, 98]), ('icl', 'blind'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from icl_lens.hooks.interventions import DemoKV, Intervention, InterventionHooks
from icl_lens.hooks.logits import logit_hook
from icl_lens.hooks.prefix import PrefixRunner, pad_right
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_lens.model.adapter import HookFn, ModelAdapter

__all__ = ["InterventionLogits", "InterventionRunner"]


@dataclass
class InterventionLogits:
    """``logits[i, j]``: the logits at query ``i``'s last token under intervention ``j``."""

    logits: Float[Tensor, "query intervention d_vocab"]
    names: tuple[str, ...]
    path: str
    """``"cache"`` (the prefix's cache reused) or ``"full"`` (full forwards, see the
    PrefixRunner's ``reason``)."""


class InterventionRunner:
    """Run (query, intervention) rows after one shared prefix (BOS + demonstrations).

    ``demo_mask`` (over the prefix) marks the demonstration tokens whose keys the
    interventions act on; default every prefix token but the first (BOS).
    ``reuse=False`` runs full forwards (the reference the cached path is checked
    against).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        prefix: Int[Tensor, " prefix"],
        *,
        demo_mask: Bool[Tensor, " prefix"] | None = None,
        reuse: bool = True,
    ):
        self.adapter = adapter
        self.prefix_runner = PrefixRunner(adapter, prefix, reuse=reuse)
        n = len(prefix)
        if demo_mask is None:
            demo_mask = torch.arange(n) >= 1
        demo_mask = torch.as_tensor(demo_mask, dtype=torch.bool).cpu()
        if tuple(demo_mask.shape) != (n,):
            raise ValueError(
                f"demo_mask must cover the prefix ({n} tokens); got shape "
                f"{list(demo_mask.shape)} (a prompt's is prompt.demo_mask[: prompt.query_start])"
            )
        if not demo_mask.any():
            raise ValueError("demo_mask marks no demonstration token of the prefix")
        self.prefix = self.prefix_runner.prefix
        self.demo_mask = demo_mask
        self._demo: DemoKV | None = None

    @property
    def path(self) -> str:
        return self.prefix_runner.path

    def demo_kv(self, query: Int[Tensor, " query"]) -> DemoKV:
        """The demonstrations' keys and values (computed once, with the prefix)."""
        if self._demo is None:
            a, n = self.adapter, len(self.demo_mask)
            got = self.prefix_runner.run([query], what={"k", "v"}, logit_positions=[[0]])
            layers = range(a.n_layers)
            k = [got.values["k", layer][0, :n] for layer in layers]
            v = [got.values["v", layer][0, :n] for layer in layers]
            self._demo = DemoKV.from_prefix(a, k, v, self.demo_mask)
        return self._demo

    def run(
        self,
        queries: Sequence[Int[Tensor, " query"]],
        interventions: Sequence[Intervention],
        *,
        batch_size: int = 64,
        hooks: Sequence[tuple[str, HookFn]] = (),
        progress: bool = False,
    ) -> InterventionLogits:
        """Logits at each query's last token under each intervention.

        ``batch_size`` rows (pairs) per forward; ``hooks`` are added to every forward
        after the interventions' (e.g. a capture of what the intervention did)."""
        if not queries or not interventions:
            raise ValueError("give at least one query and one intervention")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        a = self.adapter
        shape = (a.n_layers, a.n_heads)
        for x in interventions:
            if tuple(x.knockout.shape) != shape:
                raise ValueError(
                    f"intervention {x.name!r} is for {list(x.knockout.shape)} heads; this "
                    f"model has {list(shape)} [n_layers, n_heads]: build it with this adapter"
                )
        demo = self.demo_kv(queries[0])
        pairs = [(i, j) for i in range(len(queries)) for j in range(len(interventions))]
        out = torch.empty(len(queries), len(interventions), a.d_vocab)
        chunks = range(0, len(pairs), batch_size)
        made: dict[tuple[int, ...], list] = {}  # batches of the same interventions share hooks
        for start in tqdm(chunks, desc="interventions", disable=not progress):
            rows = pairs[start : start + batch_size]
            which = tuple(j for _, j in rows)
            if which not in made:
                specs = [interventions[j] for j in which]
                made[which] = InterventionHooks(a, specs, demo).hooks()
            own = made[which]
            qs = [queries[i] for i, _ in rows]
            got = self.prefix_runner.run(
                qs, logit_positions=[[len(q) - 1] for q in qs], hooks=own + list(hooks)
            )
            for (i, j), row in zip(rows, got.logits[:, 0].float().cpu(), strict=True):
                out[i, j] = row
        return InterventionLogits(out, tuple(x.name for x in interventions), self.path)

    def zero_shot(
        self, queries: Sequence[Int[Tensor, " query"]], *, same_positions: bool = False
    ) -> Float[Tensor, "query d_vocab"]:
        """Logits at each query's last token without the demonstrations: the prefix's
        other tokens (BOS) and the query, in one plain forward (no cache, no hooks).

        ``same_positions=True`` keeps every token at its ICL position (position ids
        offset past the demonstrations), where Blind differs from it only through what
        the model's masks depend on: nothing for absolute or rotary positions; on a
        sliding-window layer the window is counted in sequence slots, so BOS stays in
        the query's window here where, in Blind, it may have left it. It needs the
        TransformerBridge (TransformerLens 4): TransformerLens 3's HookedTransformer
        takes no position ids (it derives them from the attention mask).
        """
        a = self.adapter
        if same_positions and a.line != "bridge":
            raise ValueError(
                "a zero-shot forward at the ICL positions needs position ids, which "
                "TransformerLens 3's HookedTransformer does not take (it derives positions "
                "from the attention mask); use a TransformerBridge (TransformerLens 4), or "
                "same_positions=False for the plain zero-shot forward"
            )
        lead = self.prefix[~self.demo_mask]
        tokens, lengths = pad_right([torch.cat([lead, q.cpu().long()]) for q in queries], 0)
        width = tokens.shape[1]
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        extra = {}
        if same_positions:
            n = len(self.prefix)
            kept = (~self.demo_mask).nonzero()[:, 0]
            ids = torch.cat([kept, torch.arange(n, n + width - len(lead))])
            extra["position_ids"] = ids[None].expand(len(queries), -1).to(a.device)
        last = (lengths - 1)[:, None].to(a.device)
        with a.inference():
            logits = a.forward(
                tokens.to(a.device),
                fwd_hooks=[logit_hook(last)],
                attention_mask=mask.to(a.device),
                **extra,
            )
        return logits[:, 0].float().cpu()
