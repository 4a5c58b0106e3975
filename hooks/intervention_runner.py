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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    """``logits[i, j]``: the logits at query ``i``'s last token under intervention ``j``
    (the vocabulary entries ``run`` was asked to ``keep``, else all)."""

    logits: Float[Tensor, "query intervention vocab"]
    names: tuple[str, ...]
    path: str
    """``"cache"`` (the prefix's cache reused) or ``"full"`` (full forwards, see the
    PrefixRunner's ``reason``)."""
    captured: dict[str, Tensor] = field(default_factory=dict)
    """Per hook name asked to ``capture``: its activation at query ``i``'s last token
    under intervention ``j``, ``[query, intervention, ...]``, as the interventions left it."""


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
        capture: Sequence[str] = (),
        keep: Sequence[int] | None = None,
        progress: bool = False,
    ) -> InterventionLogits:
        """Logits at each query's last token under each intervention.

        ``batch_size`` rows (pairs) per forward; ``hooks`` are added to every forward
        after the interventions' (e.g. a capture of what the intervention did);
        ``capture``: hook names whose activations at each query's last token are kept
        (after the interventions' hooks: ``hook_z`` with a transplant's term), in
        ``captured``; ``keep``: the vocabulary entries kept of the logits (e.g. the
        label words' tokens), default all."""
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
        cols = None if keep is None else torch.as_tensor(list(keep), dtype=torch.long)
        width = a.d_vocab if cols is None else len(cols)
        out = torch.empty(len(queries), len(interventions), width)
        taken: dict[str, list[Tensor]] = {name: [] for name in capture}
        now: dict[str, Tensor] = {}  # the current batch's (a retried forward overwrites)
        last: list[Tensor] = []  # the current batch's query lengths
        takers = [(name, _take_last(now, name, last)) for name in capture]
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
            last[:] = [torch.tensor([len(q) for q in qs])]
            got = self.prefix_runner.run(
                qs, logit_positions=[[len(q) - 1] for q in qs], hooks=own + list(hooks) + takers
            )
            for name in capture:
                taken[name].append(now.pop(name))
            logits = got.logits[:, 0].float().cpu()
            logits = logits if cols is None else logits[:, cols]
            for (i, j), row in zip(rows, logits, strict=True):
                out[i, j] = row
        captured = {}
        for name, parts in taken.items():
            flat = torch.cat(parts)  # pairs in order, query-major
            captured[name] = flat.reshape(len(queries), len(interventions), *flat.shape[1:])
        names = tuple(x.name for x in interventions)
        return InterventionLogits(out, names, self.path, captured)

    def zero_shot(
        self,
        queries: Sequence[Int[Tensor, " query"]],
        *,
        same_positions: bool = False,
        replace_last: Mapping[str, Tensor] | None = None,
        capture: Sequence[str] = (),
        keep: Sequence[int] | None = None,
    ) -> Float[Tensor, "query vocab"]:
        """Logits at each query's last token without the demonstrations: the prefix's
        other tokens (BOS) and the query, in one plain forward (no cache, no hooks).

        ``replace_last``: hook name -> a vector put in place of that activation at each
        query's last token (a patch, e.g. a task vector into ``hook_resid_post``);
        ``capture``: hook names whose activations at each query's last token are
        returned as well (``(logits, {name: [query, ...]})``); ``keep``: the vocabulary
        entries kept, default all.

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
        hooks = [logit_hook(last)]
        for name, vector in (replace_last or {}).items():
            hooks.append((name, _put_last(vector, lengths)))
        taken: dict[str, Tensor] = {}
        hooks += [(name, _take_last(taken, name, [lengths])) for name in capture]
        with a.inference():
            logits = a.forward(
                tokens.to(a.device),
                fwd_hooks=hooks,
                attention_mask=mask.to(a.device),
                **extra,
            )
        logits = logits[:, 0].float().cpu()
        if keep is not None:
            logits = logits[:, torch.as_tensor(list(keep), dtype=torch.long)]
        if capture:
            return logits, taken
        return logits


def _take_last(store: dict[str, Tensor], name: str, lengths: list[Tensor]) -> HookFn:
    """A hook putting ``x[b, last_b]`` in ``store[name]`` (CPU, float32): ``lengths[0]``
    holds the current batch's query lengths; the positions axis (1) holds the prefix or
    not, and right padding after the longest."""

    def hook(x: Tensor, hook=None) -> None:
        n = lengths[0].to(x.device)
        first = x.shape[1] - int(n.max())
        rows = torch.arange(x.shape[0], device=x.device)
        store[name] = x[rows, first + n - 1].detach().float().cpu()

    return hook


def _put_last(vector: Tensor, lengths: Tensor) -> HookFn:
    """A hook putting ``vector`` at each row's last token (positions axis 1)."""

    def hook(x: Tensor, hook=None) -> Tensor:
        n = lengths.to(x.device)
        first = x.shape[1] - int(n.max())
        rows = torch.arange(x.shape[0], device=x.device)
        out = x.clone()
        out[rows, first + n - 1] = vector.to(device=x.device, dtype=x.dtype)
        return out

    return hook
