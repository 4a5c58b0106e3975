"""Pay for the demonstrations once: run the shared prefix, then many query batches.

The prefix's key/value cache is reused for every batch of queries, with hooks still
firing on the new tokens. The first batch is checked against a full forward of the same
prompts; where they differ (or the model has no usable cache) the runner falls back to
full forwards with a warning that says why. It never returns silently wrong values.

Queries in a batch are right-padded: with causal attention, padding after a query's last
token cannot change any of its positions, so no position shift or mask trickery is needed.

>>> runner = PrefixRunner(adapter, prompt.prefix)                       # doctest: +SKIP
>>> out = runner.run([p.query_tokens for p in prompts], what={"attn_out"})  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.adapter import ModelAdapter
from icl_lens.hooks.capture import PER_POSITION, Capture

TOLERANCE = 1e-4


@dataclass
class BatchResult:
    """One batch of queries after the shared prefix.

    ``logits[b, j]`` is the logit vector at query token ``j`` (query-relative, right
    padded); ``values`` follow :class:`~icl_lens.hooks.Capture` with per-position
    quantities at the requested query-relative ``positions`` and k, v, scores and
    pattern covering the whole prompt (prefix + query) along their key axis.
    """

    logits: Float[Tensor, "batch query_pos d_vocab"]
    values: dict[tuple[str, int], Tensor]
    lengths: Int[Tensor, " batch"]


def pad_right(
    sequences: Sequence[Tensor], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    lengths = torch.tensor([len(s) for s in sequences])
    out = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out, lengths


class PrefixRunner:
    """Run query batches after one shared prefix, reusing its key/value cache.

    ``reuse=False`` forces full forwards (the baseline and the fallback).
    ``path`` says which was used: ``"cache"`` or ``"full"`` (and why in ``reason``).
    """

    def __init__(self, adapter: ModelAdapter, prefix: Int[Tensor, " prefix"], *, reuse=True):
        self.adapter = adapter
        self.prefix = prefix.detach().cpu().long()
        self.path = "cache" if reuse else "full"
        self.reason = "" if reuse else "prefix reuse switched off"
        self._verified = False
        self._state = None
        self._prefix_values: dict[tuple[str, int], Tensor] = {}
        self._prefix_what: frozenset[str] = frozenset()

    # ---- public -----------------------------------------------------------------
    def run(
        self,
        queries: Sequence[Int[Tensor, " query"]],
        *,
        positions: Sequence[Sequence[int]] | None = None,
        what: Iterable[str] = (),
        layers: Iterable[int] | None = None,
    ) -> BatchResult:
        """Forward ``prefix + query`` for each query; capture ``what`` at ``positions``
        (query-relative indices, default: each query's last token)."""
        a = self.adapter
        total = len(self.prefix) + max(len(q) for q in queries)
        if total > a.n_ctx:
            raise ValueError(
                f"demonstrations ({len(self.prefix)} tokens) + query "
                f"({total - len(self.prefix)} tokens) = {total} tokens exceed the model's "
                f"context of {a.n_ctx}: use fewer or shorter demonstrations"
            )
        if positions is None:
            positions = [[len(q) - 1] for q in queries]
        for q, pos in zip(queries, positions, strict=True):
            if any(not 0 <= p < len(q) for p in pos):
                raise IndexError(
                    f"position {list(pos)} out of range for a query of {len(q)} tokens"
                )
        what = frozenset(what)
        capture = Capture(a, what=what, layers=layers)
        tokens, lengths = pad_right([q.long() for q in queries], pad_id=self._pad_id())
        pos = torch.tensor([list(p) for p in positions], dtype=torch.long)
        if self.path == "cache":
            try:
                result = self._run_cached(capture, tokens, lengths, pos)
            except Exception as error:  # a model whose cache cannot be driven this way
                self._fall_back(f"the cached forward failed ({type(error).__name__}: {error})")
            else:
                if self._verified or self._matches_full(result, capture, tokens, lengths, pos):
                    return result
        return self._run_full(capture, tokens, lengths, pos)

    # ---- paths ------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = getattr(self.adapter.model, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def _mask(self, lengths: Tensor, width: int, offset: int) -> Tensor:
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return torch.cat([torch.ones(len(lengths), offset, dtype=torch.long), mask], dim=1)

    def _run_full(self, capture, tokens, lengths, pos) -> BatchResult:
        a, n_prefix = self.adapter, len(self.prefix)
        full = torch.cat([self.prefix.expand(len(tokens), -1), tokens], dim=1)
        mask = self._mask(lengths, tokens.shape[1], n_prefix)
        device = a.device
        with a.inference():
            logits = capture.run(
                full.to(device),
                positions=(pos + n_prefix).to(device),
                attention_mask=mask.to(device),
            )
        return BatchResult(logits[:, n_prefix:], dict(capture.values), lengths)

    def _ensure_state(self, what: frozenset[str], layers) -> None:
        """Run the prefix once (again only if new whole-sequence captures are asked)."""
        need = what & {"k", "v"}
        if self._state is not None and need <= self._prefix_what:
            return
        a = self.adapter
        capture = Capture(a, what=need, layers=None)
        with a.inference():
            self._state = _prefix_state(a, capture, self.prefix[None].to(a.device))
        self._prefix_values = dict(capture.values)
        self._prefix_what = frozenset(need)

    def _run_cached(self, capture, tokens, lengths, pos) -> BatchResult:
        a, n_prefix = self.adapter, len(self.prefix)
        self._ensure_state(capture.what, capture.layers)
        mask = self._mask(lengths, tokens.shape[1], n_prefix)
        device = a.device
        with a.inference():
            logits = _forward_after_prefix(
                a, self._state, capture, tokens.to(device), pos.to(device), mask.to(device)
            )
        values = dict(capture.values)
        for (what, layer), x in list(values.items()):
            # hooks see only the new tokens, except TL 3's hook_rot_k (it rotates the
            # cache and the new keys together)
            if what in ("k", "v") and x.shape[1] == tokens.shape[1]:
                before = self._prefix_values[what, layer].expand(len(tokens), -1, -1, -1)
                values[what, layer] = torch.cat([before, x], dim=1)
        return BatchResult(logits, values, lengths)

    def _matches_full(self, result, capture, tokens, lengths, pos) -> bool:
        full = self._run_full(capture, tokens[:1], lengths[:1], pos[:1])
        n = int(lengths[0])
        worst = (result.logits[:1, :n] - full.logits[:1, :n]).abs().max().item()
        worst_name = "logits"
        for key, x in full.values.items():
            y = result.values[key][:1]
            if key[0] in PER_POSITION:
                diff = (y - x).abs().max().item()
            else:  # whole-sequence k/v: compare the real (unpadded) positions only
                m = len(self.prefix) + n
                diff = (y[:, :m] - x[:, :m]).abs().max().item()
            if diff > worst:
                worst, worst_name = diff, f"{key[0]} of layer {key[1]}"
        scale = max(1.0, full.logits[:1, :n].abs().max().item())
        if worst > TOLERANCE * scale:
            self._fall_back(
                f"reusing the prefix cache changed {worst_name} by {worst:.3g} against a "
                "full forward (this TransformerLens/transformers pair does not fill or "
                "read the cache correctly)"
            )
            return False
        self._verified = True
        return True

    def _fall_back(self, reason: str) -> None:
        self.path, self.reason = "full", reason
        warnings.warn(
            f"icl-lens: prefix reuse disabled, running full forwards instead: {reason}. "
            "Results stay exact; only speed is lost.",
            RuntimeWarning,
            stacklevel=3,
        )


def _prefix_state(adapter: ModelAdapter, capture: Capture, prefix: Tensor):
    """Run the prefix and return its cache (line-specific, opaque)."""
    model = adapter.model
    hooks = capture.hooks(None)
    if adapter.line == "bridge":
        with model.hooks(fwd_hooks=hooks):
            _, cache = model(prefix, return_type="logits_and_cache", use_cache=True)
        capture._finish_rotary(None)
        if cache is None or not hasattr(cache, "layers") or cache.get_seq_length() == 0:
            raise RuntimeError("the model returned no key/value cache")
        return [(layer.keys, layer.values) for layer in cache.layers]
    from transformer_lens import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    with model.hooks(fwd_hooks=hooks):
        model(prefix, past_kv_cache=cache, attention_mask=torch.ones_like(prefix))
    capture._finish_rotary(None)
    return cache


def _forward_after_prefix(adapter, state, capture: Capture, tokens, pos, mask) -> Tensor:
    model, batch = adapter.model, len(tokens)
    hooks = capture.hooks(pos)
    if adapter.line == "bridge":
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(state):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        with model.hooks(fwd_hooks=hooks), warnings.catch_warnings():
            # the bridge forwards past_key_values=, which transformers >= 5.24 renames
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            logits = model(tokens, past_key_values=cache, use_cache=True, attention_mask=mask)
    else:
        from transformer_lens import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [
            TransformerLensKeyValueCacheEntry(
                e.past_keys.expand(batch, -1, -1, -1),
                e.past_values.expand(batch, -1, -1, -1),
                frozen=True,
            )
            for e in state.entries
        ]
        cache = TransformerLensKeyValueCache(
            entries, state.previous_attention_mask.expand(batch, -1), frozen=True
        )
        new_mask = mask[:, -tokens.shape[1] :]
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, past_kv_cache=cache, attention_mask=new_mask)
    capture._finish_rotary(pos)
    return logits
