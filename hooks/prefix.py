"""Pay for the demonstrations once: run the shared prefix, then many query batches.

The prefix's key/value cache is reused for every batch of queries, with hooks still
firing on the new tokens. The first batch is checked against a full forward of its first
prompt; where they differ (or the model has no usable cache) the runner falls back to
full forwards with a warning that says why. It never returns silently wrong values.

That check costs nothing extra: the full forward of the first prompt (prefix + first
query) is also the pass that fills the prefix cache (cut back to the prefix positions), so
the demonstrations run once in all.

Queries in a batch are right-padded: with causal attention, padding after a query's last
token cannot change any of its positions, so no position shift or mask trickery is needed.

Logits are computed only where asked (``logit_positions``): the unembedding of a
GPT-2-sized vocabulary costs about a third of a forward, and the prefix positions never
need it.

>>> runner = PrefixRunner(adapter, prompt.prefix)                       # doctest: +SKIP
>>> out = runner.run([p.query_tokens for p in prompts], what={"attn_out"})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from icl_lens.hooks.capture import PER_POSITION, Capture
from icl_lens.hooks.logits import logit_hook
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.model.adapter import HookFn, ModelAdapter

TOLERANCE = 1e-4


@dataclass
class BatchResult:
    """One batch of queries after the shared prefix.

    ``logits[b, j]`` is the logit vector at query token ``j`` (query-relative, right
    padded), or, when ``run`` was given ``logit_positions``, at the ``j``-th of those
    positions. ``values`` follow :class:`~icl_lens.hooks.Capture` with per-position
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
        logit_positions: Sequence[Sequence[int]] | None = None,
        hooks: Sequence[tuple[str, HookFn]] = (),
    ) -> BatchResult:
        """Forward ``prefix + query`` for each query; capture ``what`` at ``positions``
        (query-relative indices, default: each query's last token). ``logit_positions``
        (query-relative, the same number per query) limits the logits to those
        positions; default: every query position. ``hooks`` (``(name, fn)`` pairs) are
        added to the forward, after the capture's: they see the queries alone after the
        cached prefix, or ``prefix + query`` where the runner falls back to full
        forwards. The cache is verified without them first (they may change what the
        check compares)."""
        a = self.adapter
        a.check_token_ids(self.prefix, "the prefix (BOS and demonstrations)")
        for q in queries:
            a.check_token_ids(q, "the queries")
        total = len(self.prefix) + max(len(q) for q in queries)
        if total > a.n_ctx:
            raise ValueError(
                f"demonstrations ({len(self.prefix)} tokens) + query "
                f"({total - len(self.prefix)} tokens) = {total} tokens exceed the model's "
                f"context of {a.n_ctx}: use fewer or shorter demonstrations"
            )
        if positions is None:
            positions = [[len(q) - 1] for q in queries]
        pos = _positions(queries, positions)
        lpos = None if logit_positions is None else _positions(queries, logit_positions)
        what = frozenset(what)
        if hooks and self.path == "cache" and not self._verified:
            self.run(queries[:1])
        capture = Capture(a, what=what, layers=layers)
        hooks = list(hooks)
        tokens, lengths = pad_right([q.long() for q in queries], pad_id=self._pad_id())
        if self.path == "cache":
            try:
                reference = None
                if not self._verified:
                    first = (tokens[:1, : int(lengths[0])], lengths[:1], pos[:1])
                    lfirst = None if lpos is None else lpos[:1]
                    reference = self._reference_and_state(capture, *first, lfirst)
                result = self._run_cached(capture, tokens, lengths, pos, lpos, hooks)
            except Exception as error:  # a model whose cache cannot be driven this way
                self._fall_back(f"the cached forward failed ({type(error).__name__}: {error})")
            else:
                if self._verified or self._matches(result, reference, lengths, lpos):
                    return result
        return self._run_full(capture, tokens, lengths, pos, lpos, hooks)

    # ---- paths ------------------------------------------------------------------
    def _pad_id(self) -> int:
        tok = getattr(self.adapter.model, "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return int(pad) if pad is not None else 0

    def _mask(self, lengths: Tensor, width: int, offset: int) -> Tensor:
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return torch.cat([torch.ones(len(lengths), offset, dtype=torch.long), mask], dim=1)

    def _run_full(self, capture, tokens, lengths, pos, lpos, extra=()) -> BatchResult:
        a, n_prefix = self.adapter, len(self.prefix)
        full = torch.cat([self.prefix.expand(len(tokens), -1), tokens], dim=1)
        mask = self._mask(lengths, tokens.shape[1], n_prefix)
        device = a.device
        keep = (pos + n_prefix).to(device)
        hooks = capture.hooks(keep)
        lhook = logit_hook(None if lpos is None else (lpos + n_prefix).to(device))
        hooks += ([lhook] if lhook else []) + list(extra)
        capture.values.clear()
        with a.inference():
            logits = a.forward(full.to(device), fwd_hooks=hooks, attention_mask=mask.to(device))
        capture._finish_rotary(keep)
        if lpos is None:
            logits = logits[:, n_prefix:]
        return BatchResult(logits, dict(capture.values), lengths)

    def _ensure_state(self, what: frozenset[str]) -> None:
        """Run the prefix alone (only when new whole-sequence captures are asked after
        the first, verifying batch)."""
        need = what & {"k", "v"}
        if self._state is not None and need <= self._prefix_what:
            return
        a = self.adapter
        capture = Capture(a, what=need, layers=None)
        n_prefix = len(self.prefix)
        with a.inference():
            self._state, _ = _prefix_state(a, capture, self.prefix[None].to(a.device), n_prefix)
        self._prefix_values = dict(capture.values)
        self._prefix_what = frozenset(need)

    def _reference_and_state(self, capture, tokens, lengths, pos, lpos) -> BatchResult:
        """One full forward of ``prefix + first query``: the reference the cached path is
        checked against, and (cut back to the prefix) the cache every batch reuses."""
        a, n_prefix = self.adapter, len(self.prefix)
        need = capture.what & {"k", "v"}
        ref = Capture(a, what=capture.what, layers=None if need else capture.layers)
        full = torch.cat([self.prefix, tokens[0]])[None].to(a.device)
        keep = (pos + n_prefix).to(a.device)
        lkeep = None if lpos is None else (lpos + n_prefix).to(a.device)
        with a.inference():
            self._state, logits = _prefix_state(a, ref, full, n_prefix, keep, lkeep)
        if lpos is None:
            logits = logits[:, n_prefix:]
        values = dict(ref.values)
        self._prefix_values = {
            key: x[:, :n_prefix] for key, x in values.items() if key[0] in ("k", "v")
        }
        self._prefix_what = frozenset(need)
        return BatchResult(logits, values, lengths)

    def _run_cached(self, capture, tokens, lengths, pos, lpos, extra=()) -> BatchResult:
        a, n_prefix = self.adapter, len(self.prefix)
        self._ensure_state(capture.what)
        mask = self._mask(lengths, tokens.shape[1], n_prefix)
        device = a.device
        lkeep = None if lpos is None else lpos.to(device)
        with a.inference():
            logits = _forward_after_prefix(
                a,
                self._state,
                capture,
                tokens.to(device),
                pos.to(device),
                mask.to(device),
                lkeep,
                extra,
            )
        values = dict(capture.values)
        for (what, layer), x in list(values.items()):
            # hooks see only the new tokens, except TL 3's hook_rot_k (it rotates the
            # cache and the new keys together)
            if what in ("k", "v") and x.shape[1] == tokens.shape[1]:
                before = self._prefix_values[what, layer].expand(len(tokens), -1, -1, -1)
                values[what, layer] = torch.cat([before, x], dim=1)
        return BatchResult(logits, values, lengths)

    def _matches(self, result, full, lengths, lpos) -> bool:
        """Every quantity of the first query within TOLERANCE of the full forward,
        relative to that quantity's own size (at least 1): Gemma's attention outputs
        reach thousands, where float32 rounding alone differs by 1e-3."""
        n = int(lengths[0])
        got, want = result.logits[:1], full.logits[:1]
        if lpos is None:
            got, want = got[:, :n], want[:, :n]
        pairs = [("logits", got, want)]
        m = len(self.prefix) + n  # the reference has no padding: compare real positions
        for key, y in result.values.items():
            x, y = full.values[key], y[:1]
            if key[0] in ("scores", "pattern"):  # key axis last
                x, y = x[..., :m], y[..., :m]
            elif key[0] not in PER_POSITION:  # whole-sequence k/v
                x, y = x[:, :m], y[:, :m]
            pairs.append((f"{key[0]} of layer {key[1]}", y, x))
        for name, y, x in pairs:
            if name.startswith("scores"):  # captured with -inf where masked
                if not torch.equal(torch.isneginf(x), torch.isneginf(y)):
                    return self._mismatch(f"the attention mask of {name}")
                x, y = x.masked_fill(torch.isneginf(x), 0), y.masked_fill(torch.isneginf(y), 0)
            diff = (y - x).abs().max().item()
            scale = max(1.0, x.abs().max().item())
            if not diff <= TOLERANCE * scale:
                return self._mismatch(f"{name} by {diff:.3g} (of {scale:.3g})")
        self._verified = True
        return True

    def _mismatch(self, what: str) -> bool:
        self._fall_back(
            f"reusing the prefix cache changed {what} against a full forward (this "
            "TransformerLens/transformers pair does not fill or read the cache correctly)"
        )
        return False

    def _fall_back(self, reason: str) -> None:
        self.path, self.reason = "full", reason
        self._state, self._prefix_values = None, {}
        warnings.warn(
            f"icl-lens: prefix reuse disabled, running full forwards instead: {reason}. "
            "Results stay exact; only speed is lost.",
            RuntimeWarning,
            stacklevel=3,
        )


def _positions(queries: Sequence[Tensor], positions: Sequence[Sequence[int]]) -> Tensor:
    for q, pos in zip(queries, positions, strict=True):
        if any(not 0 <= p < len(q) for p in pos):
            raise IndexError(f"position {list(pos)} out of range for a query of {len(q)} tokens")
    return torch.tensor([list(p) for p in positions], dtype=torch.long)


def _prefix_state(
    adapter: ModelAdapter,
    capture: Capture,
    tokens: Int[Tensor, "1 pos"],
    keep: int,
    positions: Tensor | None = None,
    logit_positions: Tensor | None = None,
):
    """Forward one sequence with ``capture`` (at ``positions``) and return its
    key/value cache cut back to the first ``keep`` positions (line-specific, opaque),
    and the logits: at ``logit_positions``, at every position when ``positions`` is
    given without them, else at the last position only (nothing reads them)."""
    model = adapter.model
    hooks = capture.hooks(positions)
    lhook = logit_hook(logit_positions, last=positions is None and logit_positions is None)
    hooks += [lhook] if lhook else []
    if adapter.line == "bridge":
        from transformers import DynamicCache

        # A cache built without the model's config keeps every key of every layer; the
        # model's own (DynamicCache(config=...)) keeps only the last window - 1 keys of
        # a sliding-window layer (Gemma 2/3, Mistral), so it cannot be cut back to a
        # prefix longer than the window. The sliding-window mask is built from positions,
        # not from what the cache holds, so the longer cache changes nothing else.
        with model.hooks(fwd_hooks=hooks), _cache_kwarg_renamed():
            logits, cache = model(
                tokens, return_type="logits_and_cache", past_key_values=DynamicCache()
            )
        capture._finish_rotary(positions)
        if cache is None or not hasattr(cache, "layers") or cache.get_seq_length() == 0:
            raise RuntimeError("the model returned no key/value cache")
        state = [
            (layer.keys.narrow(-2, 0, keep), layer.values.narrow(-2, 0, keep))
            for layer in cache.layers
        ]
        return state, logits
    from transformer_lens import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens))
    capture._finish_rotary(positions)
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys.narrow(1, 0, keep), e.past_values.narrow(1, 0, keep)
        )
        for e in cache.entries
    ]
    state = TransformerLensKeyValueCache(entries, cache.previous_attention_mask[:, :keep])
    return state, logits


@contextlib.contextmanager
def _cache_kwarg_renamed():
    """The bridge forwards ``past_key_values=``, which transformers >= 5.24 renames."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        yield


@functools.cache
def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """The shared prefix's keys and values (batch 1), never extended: each layer's
        ``update`` returns prefix + the batch's new keys/values without keeping them.

        A plain DynamicCache filled with the expanded prefix copies it once per row to
        fill and again per layer to extend, and keeps every layer's copies until the
        forward ends (about 1 GB for GPT-2 small, k=32, a batch of 8); here one layer's
        concatenation lives at a time. A fresh one per batch: nothing carries over.
        """

        def __init__(self, state):
            super().__init__()
            for i, (k, v) in enumerate(state):
                DynamicCache.update(self, k, v, i)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer, batch = self.layers[layer_idx], key_states.shape[0]
            keys = torch.cat([layer.keys.expand(batch, -1, -1, -1), key_states], dim=-2)
            values = torch.cat([layer.values.expand(batch, -1, -1, -1), value_states], dim=-2)
            return keys, values

    return PrefixCache


def _forward_after_prefix(
    adapter, state, capture: Capture, tokens, pos, mask, logit_positions=None, extra=()
) -> Tensor:
    model, batch = adapter.model, len(tokens)
    hooks = capture.hooks(pos)
    lhook = logit_hook(logit_positions)
    hooks += ([lhook] if lhook else []) + list(extra)
    if adapter.line == "bridge":
        cache = _prefix_cache_class()(state)
        with model.hooks(fwd_hooks=hooks), _cache_kwarg_renamed():
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
