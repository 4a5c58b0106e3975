"""The one place that knows how TransformerLens 3 and 4 differ.

Everything else in icl-lens reads the shared hook names
(``blocks.{l}.attn.hook_q``...) through a :class:`ModelAdapter`, never the model class.

>>> import icl_lens as il
>>> adapter = il.adapt(il.toy_model())                    # doctest: +SKIP
>>> adapter.line, adapter.n_layers, adapter.n_kv_heads    # doctest: +SKIP
('bridge', 3, 4)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

Line = Literal["bridge", "hooked"]
HookFn = Callable[[Tensor, object], Tensor | None]

SUPPORTED = (
    "transformer_lens.model_bridge.TransformerBridge (TransformerLens 4.x) or "
    "transformer_lens.HookedTransformer (TransformerLens 3.x)"
)


def _line_of(model: object) -> Line | None:
    names = {cls.__name__ for cls in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedTransformer" in names:
        return "hooked"
    return None


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _bridge_cache_kwarg_shim(module, args, kwargs):
    """transformers >= 5.24 passes the KV cache as ``cache=``; the bridge's attention
    only reads ``past_key_values=``/``layer_past=`` and so never fills the cache.
    Copy it across. Prefix reuse is still verified against a full forward."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def _bridge_drop_pattern(module, args, output):
    """TransformerLens 4.3's bridge attention keeps its last attention pattern
    (``_pattern``, read nowhere) on every layer: a forward holds all layers' patterns
    at once (GPT-2 small on 900 tokens: 420 MB; a 7B model on 2000 tokens: gigabytes)
    and, after a training step, their autograd graph too. Drop it once the layer is
    done; hooks (hook_pattern) still see every pattern."""
    if getattr(module, "_pattern", None) is not None:
        module._pattern = None


def _in_training(model: torch.nn.Module) -> bool:
    """Whether any module is in training mode (the bridge keeps the transformers model
    outside its module tree, so it is checked too)."""
    original = getattr(model, "original_model", None)
    parts = [model] + ([original] if isinstance(original, torch.nn.Module) else [])
    return any(m.training for part in parts for m in part.modules())


def _bridge_keep_mask(module, args, kwargs):
    """Keep the attention mask the bridge's attention is handed (the model's own: causal,
    sliding window, padding), so that :meth:`ModelAdapter.masked_as_neginf` reads masked
    keys from it. One reference per layer, replaced by the next forward; layers of one
    kind share the tensor."""
    module._icl_lens_mask = kwargs.get("attention_mask")


def _seen_keys(mask: Tensor | None, n_query: int, n_key: int, device) -> Tensor:
    """``[batch | 1, 1, query, key]``: True where the bridge's attention lets a query see
    a key, read from ``mask`` as TransformerLens 4 applies it (a 4D mask as it is, the
    last ``n_query`` rows; otherwise causal, and the mask on top). A boolean mask is True
    where allowed; an additive one holds the dtype's minimum (or -inf) where masked, the
    sentinel transformers writes, so half of it tells the two apart with room for a
    fused bias. The scores are never read: a masked score plus the sentinel can round to
    anything in half precision (float16: -65504 + a score of 3 is -65504, which is no
    float32 minimum)."""
    seen = None
    if mask is None or mask.ndim < 4:
        seen = torch.ones(n_query, n_key, dtype=torch.bool, device=device)
        seen = seen.tril(n_key - n_query)[None, None]
    if mask is None:
        return seen
    mask = mask.to(device)[..., :n_key]
    if mask.ndim >= 3:
        mask = mask[..., -n_query:, :]
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask > torch.finfo(mask.dtype).min / 2
    else:
        allowed = mask != 0
    while allowed.ndim < 4:  # [batch, key] or [batch, query, key]
        allowed = allowed[:, None] if allowed.ndim == 3 else allowed[:, None, None]
    return allowed if seen is None else allowed & seen


@dataclass(frozen=True)
class ModelAdapter:
    """A hooked model plus the facts icl-lens needs about it.

    Build one with :func:`adapt`. ``q_name``/``k_name`` point at post-rotary hooks where
    the model has them; where a rotary model has none (the bridge on GPT-NeoX),
    :meth:`rotate` applies the model's own cos/sin (captured from ``hook_cos``/``hook_sin``).
    """

    model: torch.nn.Module
    line: Line
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    rotary: bool
    has_rot_hooks: bool

    def with_model(self, model: torch.nn.Module) -> ModelAdapter:
        """The same facts for a copy of this model (an FT or untrained copy, same
        architecture and hooks): no second probe forward, no second set of checks."""
        return replace(self, model=model)

    # ---- hook names -------------------------------------------------------------
    def name(self, layer: int, what: str) -> str:
        """Hook name for ``what`` in q, k, v, z, scores, pattern, attn_out, cos, sin,
        resid_pre, resid_post. q and k are post-rotary where the model exposes it."""
        attn = f"blocks.{layer}.attn."
        table = {
            "q": attn + ("hook_rot_q" if self.has_rot_hooks else "hook_q"),
            "k": attn + ("hook_rot_k" if self.has_rot_hooks else "hook_k"),
            "v": attn + "hook_v",
            "z": attn + "hook_z",
            "scores": attn + "hook_attn_scores",
            "pattern": attn + "hook_pattern",
            "cos": attn + "hook_cos",
            "sin": attn + "hook_sin",
            "attn_out": f"blocks.{layer}.hook_attn_out",
            "resid_pre": f"blocks.{layer}.hook_resid_pre",
            "resid_post": f"blocks.{layer}.hook_resid_post",
            "post_norm_scale": f"blocks.{layer}.ln1_post.hook_scale",
        }
        return table[what]

    @property
    def manual_rotary(self) -> bool:
        """True when q/k hooks are pre-rotary and icl-lens must rotate them itself."""
        return self.rotary and not self.has_rot_hooks

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def rotate(
        self,
        x: Float[Tensor, "batch pos head d_head"],
        cos: Float[Tensor, "batch pos rot"],
        sin: Float[Tensor, "batch pos rot"],
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Apply rotary embedding (HF's rotate-half convention, partial rotary aware)."""
        rot = cos.shape[-1]
        cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

    # ---- attention as the model computes it -----------------------------------------
    def score_scale(self, layer: int) -> float:
        """The factor the model multiplies ``q . k`` by before the softmax: 1/sqrt(d_head)
        for most models, 1/sqrt(query_pre_attn_scalar) for Gemma 2/3. q and k are the
        hooked ones (after QK-norm and rotary), so ``scores == score_scale * q . k``."""
        attn = self.model.blocks[layer].attn
        if self.line == "bridge":
            scaling = getattr(getattr(attn, "original_component", None), "scaling", None)
            return float(scaling) if scaling is not None else self.d_head**-0.5
        return 1.0 / float(attn.attn_scale) if self.model.cfg.use_attn_scale else 1.0

    def post_attn_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm between the attention output and the residual add (Gemma 2/3's
        post_attention_layernorm), or None: ``hook_attn_out`` is after it."""
        return getattr(self.model.blocks[layer], "ln1_post", None)

    def norm_weight(self, norm: torch.nn.Module) -> Float[Tensor, " d_model"]:
        """The per-channel scale a LayerNorm/RMSNorm applies after normalising.

        Gemma stores it as an offset from one (``1 + w``): the bridge keeps ``w`` and
        adds the one at run time, TransformerLens 3 adds it when converting weights."""
        if self.line == "bridge":
            weight = getattr(norm, "weight", None)
            if weight is None:
                return torch.ones(self.d_model, device=self.device, dtype=self.dtype)
            weight = weight.detach()
            return 1.0 + weight if getattr(norm, "uses_weight_offset", False) else weight
        weight = getattr(norm, "w", None)
        if weight is None:
            return torch.ones(self.d_model, device=self.device, dtype=self.dtype)
        return weight.detach()

    def masked_as_neginf(
        self, layer: int, scores: Float[Tensor, "batch head query key"]
    ) -> Float[Tensor, "batch head query key"]:
        """``layer``'s pre-softmax scores from the forward that produced them (a
        ``hook_attn_scores`` hook or the last forward) with every key the model masked
        (causal, sliding window, padding) at ``-inf``, in any dtype.

        Masked keys are read from the mask, never from the score's value: TransformerLens
        3 writes ``-inf`` there itself; the bridge adds the dtype's minimum to the score
        (in float16 -65504, indistinguishable from a large score once cast to float32),
        so its attention mask is kept for each layer and read here."""
        if self.line == "hooked":
            return scores
        mask = getattr(self.model.blocks[layer].attn, "_icl_lens_mask", None)
        seen = _seen_keys(mask, scores.shape[-2], scores.shape[-1], scores.device)
        return scores.masked_fill(~seen, float("-inf"))

    # ---- weights ----------------------------------------------------------------
    def W_O(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        return self.model.blocks[layer].attn.W_O.detach()

    def b_O(self, layer: int) -> Float[Tensor, " d_model"]:
        try:
            b = self.model.blocks[layer].attn.b_O
        except (AttributeError, RuntimeError, ValueError):
            b = None
        if b is None:
            return torch.zeros(self.d_model, device=self.device, dtype=self.dtype)
        return b.detach()

    @property
    def d_vocab(self) -> int:
        """Rows of the embedding table: every token id must be below this."""
        return int(self.model.cfg.d_vocab)

    def check_token_ids(self, tokens: Tensor, what: str = "the tokens") -> None:
        """Refuse ids outside the model's vocabulary (tokens made with another model's
        tokenizer) before they index past the embedding table deep inside torch."""
        if tokens.numel() == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.d_vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"{what} hold token id {bad}, outside this model's vocabulary of "
                f"{self.d_vocab} tokens (ids 0..{self.d_vocab - 1}): they were made with "
                "another model's tokenizer; build them with this model's (model.tokenizer)"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def kv_parameters(self, model: torch.nn.Module | None = None) -> list[tuple[str, Tensor]]:
        """The key/value projection weights and biases of every attention layer, the
        only parameters the paper's FT baseline trains. ``model`` defaults to the
        adapted one; pass a copy to get the copy's tensors."""
        model = self.model if model is None else model
        found: list[tuple[str, Tensor]] = []
        for layer in range(self.n_layers):
            attn = model.blocks[layer].attn
            if self.line == "bridge":
                for proj in ("k", "v"):
                    for pname, p in getattr(attn, proj).named_parameters():
                        found.append((f"blocks.{layer}.attn.{proj}.{pname}", p))
            else:
                for pname, p in attn.named_parameters(recurse=False):
                    if pname.lstrip("_") in ("W_K", "W_V", "b_K", "b_V"):
                        found.append((f"blocks.{layer}.attn.{pname}", p))
        if not found:
            raise TypeError("found no key/value projection parameters in the model")
        return found

    def unembed_residual(
        self, resid: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of a residual stream read through the final norm and unembedding (the
        logit lens); for the last block's output these are the model's logits."""
        ln_final = getattr(self.model, "ln_final", None)
        weight = next(self.model.unembed.parameters(), None)
        if weight is not None:  # layers may live on several devices
            resid = resid.to(weight.device)
        return self.model.unembed(resid if ln_final is None else ln_final(resid))

    # ---- running ----------------------------------------------------------------
    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode (dropout off) and no grad, restoring the caller's training flag.

        A model already in eval mode is left alone: ``eval()`` and ``train()`` walk
        every module (Gemma 3 270M on the bridge: 90 ms the pair, 2 s of a 10 s capture
        run that enters this once per batch), reading the flags takes 5 ms."""
        was_training = self.model.training
        switch = _in_training(self.model)
        if switch:
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if switch:
                self.model.train(was_training)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        *,
        fwd_hooks: list[tuple[str, HookFn]] = (),
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        **kwargs,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of a forward with temporary hooks, on either TransformerLens line.

        Tokens are used as given: no BOS is prepended."""
        self.check_token_ids(tokens)
        if tokens.shape[-1] > self.n_ctx:
            raise ValueError(
                f"a sequence of {tokens.shape[-1]} tokens does not fit the model's context "
                f"of {self.n_ctx}: use fewer or shorter demonstrations"
            )
        extra = dict(kwargs)
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            return self.model(tokens, **extra)


def _hooks_that_fire(model) -> frozenset[str]:
    """Names of layer-0 hooks that really fire: the bridge lists aliases (e.g.
    hook_rot_q on GPT-NeoX) in hook_dict that its forward never calls."""
    cached = getattr(model, "_icl_lens_fired_hooks", None)
    if cached is not None:
        return cached
    fired = set()
    wanted = ["attn.hook_" + n for n in ("q", "k", "v", "z", "attn_scores", "pattern")]
    wanted += ["attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_cos", "attn.hook_sin"]
    wanted += ["hook_attn_out"]
    candidates = [f"blocks.0.{n}" for n in wanted if f"blocks.0.{n}" in model.hook_dict]

    hooks = [(n, lambda x, hook, n=n: fired.add(n)) for n in candidates]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    fired = frozenset(fired)
    try:
        model._icl_lens_fired_hooks = fired
    except AttributeError:
        pass
    return fired


def adapt(model: object) -> ModelAdapter:
    """Wrap a TransformerLens model (an adapter is returned as it is); raise TypeError
    for anything else. Make it once and pass it down: every public icl-lens function
    that takes a model takes its adapter too; a copy gets :meth:`ModelAdapter.with_model`.

    >>> adapt(object())
    Traceback (most recent call last):
    ...
    TypeError: icl-lens needs a TransformerLens hooked model: ...
    """
    if isinstance(model, ModelAdapter):
        return model
    line = _line_of(model)
    if line is None:
        raise TypeError(
            f"icl-lens needs a TransformerLens hooked model: {SUPPORTED}; got "
            f"{type(model).__module__}.{type(model).__name__}. Load one with "
            "icl_lens.load_model(name_or_dir) or wrap a transformers model with "
            "icl_lens.load_model(hf_model, tokenizer=tok)."
        )
    cfg = model.cfg
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    rotary = getattr(cfg, "positional_embedding_type", "standard") == "rotary"
    hook_names = _hooks_that_fire(model)
    has_rot = "blocks.0.attn.hook_rot_q" in hook_names
    needed = ["hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern"]
    missing = [n for n in needed if f"blocks.0.attn.{n}" not in hook_names]
    if "blocks.0.hook_attn_out" not in hook_names:
        missing.append("hook_attn_out")
    if rotary and not has_rot and "blocks.0.attn.hook_cos" not in hook_names:
        missing.append("hook_rot_q/hook_rot_k or hook_cos/hook_sin")
    if missing:
        raise TypeError(
            f"this {type(model).__name__} lacks the attention hooks icl-lens reads: "
            f"{', '.join(missing)}. icl-lens supports standard decoder attention "
            "(GPT-2, GPT-NeoX/Pythia, Llama-style grouped-query attention, ...)."
        )
    if line == "bridge":
        for block in model.blocks:
            attn = block.attn
            if not getattr(attn, "_icl_lens_cache_shim", False):
                attn.register_forward_pre_hook(_bridge_cache_kwarg_shim, with_kwargs=True)
                attn._icl_lens_cache_shim = True
            if not getattr(attn, "_icl_lens_keeps_mask", False):
                attn.register_forward_pre_hook(_bridge_keep_mask, with_kwargs=True)
                attn._icl_lens_keeps_mask = True
            if not getattr(attn, "_icl_lens_drops_pattern", False):
                attn.register_forward_hook(_bridge_drop_pattern)
                attn._icl_lens_drops_pattern = True
    return ModelAdapter(
        model=model,
        line=line,
        n_layers=cfg.n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        rotary=rotary,
        has_rot_hooks=has_rot,
    )
