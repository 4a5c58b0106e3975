"""The per-head duality decomposition of Dai et al. (2023), method.md section 2.

At a query position with query vector q, each head's relaxed linear attention output
splits exactly into a zero-shot part and an in-context "meta-gradient" part:

    sum_j v_j (k_j . q) = W_ZSL q + dW_ICL q,
    W_ZSL = sum_{j in BOS and query tokens} v_j k_j^T,   dW_ICL = sum_{i in demos} v_i k_i^T.

Everything is read from the q, k, v the model computed: the ones that enter its dot
product (after QK-norm and rotary, grouped-query aware). Both sums run over the keys
the head can see from the position, read from the model's own attention mask: causal,
and on a sliding-window (local) layer only the last ``window`` tokens, so a
demonstration token outside a local layer's window is in neither term. The scaling is
dropped as in the paper (``score_scale`` holds the model's own factor: 1/sqrt(d_head),
Gemma's 1/sqrt(query_pre_attn_scalar)). The softmax output splits exactly too,
z = alpha z_demo + (1 - alpha) z_query; the relaxation itself is an approximation and
its gap to the real head output is reported per head, not hidden.

Models with a norm after the attention block (Gemma 2/3's post_attention_layernorm)
add ``post_norm(attn)`` to the residual stream: per position that is a per-channel
scale, frozen at this forward (``post_norm``), which :meth:`Decomposition.to_resid`
applies after W_O, as direct logit attribution freezes the final norm's scale.

Weight processing: ``v`` is whatever ``hook_v`` holds. icl-lens's loader keeps value
biases in ``v``; if you loaded with TransformerLens's ``fold_value_biases`` (the
``from_pretrained`` default on TransformerLens 3), b_V sits in b_O instead and the
relaxed terms change (the softmax terms do not, since attention weights sum to one).

>>> import icl_lens as il
>>> model = il.toy_model()                                              # doctest: +SKIP
>>> prompt = il.icl_prompt(model, shots=8, seed=0)                      # doctest: +SKIP
>>> dec = il.decompose(model, prompt)                                   # doctest: +SKIP
>>> dec.to_frame().sort_values("icl_norm_ratio", ascending=False).head()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_lens.analyses import with_head_labels
from icl_lens.data.prompts import Prompt, check_prompts
from icl_lens.hooks.capture import Capture
from icl_lens.hooks.interventions import DemoKV, Intervention, InterventionHooks
from icl_lens.model.adapter import adapt

WHAT = ("q", "k", "v", "z", "scores", "pattern", "attn_out")


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


@dataclass
class Decomposition:
    """Per layer, head and recorded position: the ZSL and ICL terms of each head.

    Shapes use ``layer`` (the decomposed layers, in the order of :attr:`layers`),
    ``head`` (query heads), ``n_pos`` (recorded positions, in the order of
    :attr:`positions`; default the prediction position), ``pos`` (prompt tokens) and
    ``d_head``. Key/value tensors are already expanded to query heads.

    The methods take the model's layer numbers: ``dec.contributions(layer=2, head=1)``
    is layer 2 whichever layers were decomposed. To index the tensors yourself use
    :meth:`index_of`: ``dec.zsl[dec.index_of(layer=2, head=1)]``.
    """

    prompt: Prompt
    layers: Int[Tensor, " layer"]
    positions: Int[Tensor, " n_pos"]
    zsl: Float[Tensor, "layer head n_pos d_head"]
    """W_ZSL q: BOS and query-side tokens up to the position."""
    icl: Float[Tensor, "layer head n_pos d_head"]
    """dW_ICL q: the demonstration tokens' meta-gradient term."""
    key_dot_query: Float[Tensor, "layer head n_pos pos"]
    """k_j . q for every key token j the head sees; 0 where it does not (after the
    position, or outside a local layer's sliding window)."""
    visible: Bool[Tensor, "layer head n_pos pos"]
    """Keys the head attends to from each position, as the model masked them."""
    score_scale: Float[Tensor, " layer"]
    """The model's factor on q . k before the softmax (dropped in the relaxation)."""
    values: Float[Tensor, "layer head pos d_head"]
    pattern: Float[Tensor, "layer head n_pos pos"]
    z: Float[Tensor, "layer head n_pos d_head"]
    """The true (softmax) head output, hook_z."""
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    attn_out: Float[Tensor, "layer n_pos d_model"]
    """hook_attn_out: sum over heads of z W_O, plus b_O (then ``post_norm``)."""
    post_norm: Float[Tensor, "layer n_pos d_model"] | None = None
    """Per-channel scale of the norm after attention (Gemma 2/3), frozen at this
    forward; None for models without one."""
    W_ZSL: Float[Tensor, "layer head n_pos d_head d_head"] | None = None
    dW_ICL: Float[Tensor, "layer head n_pos d_head d_head"] | None = None
    """Per position: with a sliding window the visible demonstrations depend on it."""
    label_direction: Float[Tensor, "layer n_pos d_model"] | None = None
    """Residual direction whose dot product is a head's direct effect on the label
    logit difference (final norm scale applied), when label tokens were given."""

    # ---- masks and exact splits ----------------------------------------------------
    @property
    def demo_mask(self) -> Bool[Tensor, " pos"]:
        return self.prompt.demo_mask

    @property
    def query_side_mask(self) -> Bool[Tensor, "n_pos pos"]:
        """BOS and query tokens up to (and including) each recorded position (of
        which a local layer sees only those in its window: see ``visible``)."""
        upto = torch.arange(self.prompt.n_tokens)[None, :] <= self.positions[:, None]
        return upto & ~self.demo_mask[None, :]

    @property
    def demo_mass(self) -> Float[Tensor, "layer head n_pos"]:
        """alpha: softmax attention mass on demonstration tokens."""
        return self.pattern[..., self.demo_mask].sum(-1)

    @property
    def z_demo(self) -> Float[Tensor, "layer head n_pos d_head"]:
        """Softmax output restricted to demonstrations, renormalised (alpha z_demo is
        the demonstrations' share of z)."""
        p = self.pattern * self.demo_mask
        return torch.einsum("lhnp,lhpd->lhnd", p, self.values) / self.demo_mass[..., None].clamp(
            min=1e-30
        )

    @property
    def z_query(self) -> Float[Tensor, "layer head n_pos d_head"]:
        p = self.pattern * self.query_side_mask
        mass = p.sum(-1, keepdim=True).clamp(min=1e-30)
        return torch.einsum("lhnp,lhpd->lhnd", p, self.values) / mass

    @property
    def z_split(self) -> Float[Tensor, "layer head n_pos d_head"]:
        """alpha z_demo + (1 - alpha) z_query; equals ``z`` exactly."""
        a = self.demo_mass[..., None]
        return a * self.z_demo + (1 - a) * self.z_query

    @property
    def relaxed(self) -> Float[Tensor, "layer head n_pos d_head"]:
        """The relaxed linear attention output W_ZSL q + dW_ICL q."""
        return self.zsl + self.icl

    # ---- where a layer, head and recorded position sit in the tensors ---------------------
    def recorded_position(self, n: int = 0) -> int:
        """The token position recorded at ``n`` (``positions[n]``): ``n`` counts the
        recorded positions, 0..n_pos-1, in the order they were given to decompose."""
        n = _integer(n, "n")
        n_pos = len(self.positions)
        if not 0 <= n < n_pos:
            raise IndexError(
                f"n={n} out of range: n counts the recorded positions "
                f"{self.positions.tolist()} (0..{n_pos - 1}), it is not a token position; "
                "decompose(..., positions=[...]) records others"
            )
        return int(self.positions[n])

    def index_of(self, layer: int, head: int, n: int = 0) -> tuple[int, int, int]:
        """``(layer axis, head, n)`` of the model's layer ``layer``, head ``head`` and
        recorded position ``n`` in the tensors: the layer axis follows :attr:`layers`.

        >>> from tests.models import make_model, make_tokenizer
        >>> import icl_lens as il
        >>> model, _ = make_model("gpt2")
        >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
        >>> il.decompose(model, p, layers=[1]).index_of(layer=1, head=2)
        (0, 2, 0)
        """
        layer, layers = _integer(layer, "layer"), self.layers.tolist()
        if layer < 0:
            raise IndexError(
                f"layer {layer} was not decomposed: layers are the model's layer numbers, "
                f"counted from 0, not from the end; choose one of {layers}"
            )
        if layer not in layers:
            raise IndexError(
                f"layer {layer} was not decomposed: choose one of {layers}, or "
                f"decompose(..., layers=[..., {layer}])"
            )
        head, n_heads = _integer(head, "head"), self.zsl.shape[1]
        if not 0 <= head < n_heads:
            raise IndexError(
                f"head {head} out of range: the model has {n_heads} heads (0..{n_heads - 1})"
            )
        n = _integer(n, "n")
        self.recorded_position(n)
        return layers.index(layer), head, n

    # ---- per-token meta-gradients ----------------------------------------------------
    def contributions(self, layer: int, head: int, n: int = 0) -> Float[Tensor, "demo d_head"]:
        """v_i (k_i . q) for each demonstration token i (rows in prompt order; zero for
        tokens outside the head's window) of head ``head`` of the model's layer
        ``layer`` at recorded position ``n``."""
        li, head, n = self.index_of(layer, head, n)
        s = self.key_dot_query[li, head, n, self.demo_mask]
        return self.values[li, head, self.demo_mask] * s[:, None]

    def head_to_resid(
        self, layer: int, head: int, n: int, x: Float[Tensor, "... d_head"]
    ) -> Float[Tensor, "... d_model"]:
        """Vectors of one head (the model's layer ``layer``) at recorded position ``n``
        mapped into the residual stream: through W_O, then the frozen post-attention
        norm where there is one."""
        li, head, n = self.index_of(layer, head, n)
        resid = x @ self.W_O[li, head]
        return resid if self.post_norm is None else resid * self.post_norm[li, n]

    def token_effects(self, layer: int, head: int, n: int = 0) -> Float[Tensor, " pos"]:
        """Each token's term mapped through W_O and onto the label direction (or, with
        no label tokens given, its norm in the residual stream). Demonstration and
        query tokens alike; zero after the position. ``layer`` is the model's."""
        li, head, n = self.index_of(layer, head, n)
        terms = self.values[li, head] * self.key_dot_query[li, head, n][:, None]
        resid = self.head_to_resid(layer, head, n, terms)
        if self.label_direction is None:
            return resid.norm(dim=-1)
        return resid @ self.label_direction[li, n]

    # ---- through W_O -----------------------------------------------------------------
    def to_resid(
        self, per_head: Float[Tensor, "layer head n_pos d_head"]
    ) -> Float[Tensor, "layer head n_pos d_model"]:
        """Map per-head vectors into the residual stream through each head's W_O (and
        the frozen post-attention norm where the model has one)."""
        resid = torch.einsum("lhnd,lhdm->lhnm", per_head, self.W_O)
        return resid if self.post_norm is None else resid * self.post_norm[:, None]

    @property
    def head_outputs(self) -> Float[Tensor, "layer head n_pos d_model"]:
        return self.to_resid(self.z)

    # ---- gap between the relaxation and softmax attention ------------------------------
    @property
    def relaxation_cosine(self) -> Float[Tensor, "layer head n_pos"]:
        return _cos(self.relaxed, self.z)

    @property
    def relaxation_relative_error(self) -> Float[Tensor, "layer head n_pos"]:
        """|relaxed - z| / |z|: the unnormalised relaxation's full departure."""
        return (self.relaxed - self.z).norm(dim=-1) / self.z.norm(dim=-1).clamp(min=1e-30)

    @property
    def demo_direction_cosine(self) -> Float[Tensor, "layer head n_pos"]:
        """cos(dW_ICL q, z_demo): does the linear meta-gradient point where the softmax
        demonstration part does?"""
        return _cos(self.icl, self.z_demo)

    # ---- tidy view ------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, head, position); ``head_label`` names the head as
        TransformerLens does (``L{layer}H{head}``)."""
        n_layers, n_heads, n_pos = self.zsl.shape[:3]
        zsl_norm, icl_norm = self.zsl.norm(dim=-1), self.icl.norm(dim=-1)
        cols = {
            "zsl_norm": zsl_norm,
            "icl_norm": icl_norm,
            "icl_norm_ratio": icl_norm / zsl_norm.clamp(min=1e-30),
            "demo_mass": self.demo_mass,
            "relax_cos": self.relaxation_cosine,
            "relax_rel_err": self.relaxation_relative_error,
            "demo_cos": self.demo_direction_cosine,
        }
        if self.label_direction is not None:
            d = self.label_direction[:, None]  # layer 1 n_pos d_model
            cols["zsl_effect"] = (self.to_resid(self.zsl) * d).sum(-1)
            cols["icl_effect"] = (self.to_resid(self.icl) * d).sum(-1)
            cols["head_effect"] = (self.head_outputs * d).sum(-1)
        index = torch.cartesian_prod(
            torch.arange(n_layers), torch.arange(n_heads), torch.arange(n_pos)
        )
        frame = pd.DataFrame(
            {
                "layer": self.layers[index[:, 0]].numpy(),
                "head": index[:, 1].numpy(),
                "position": self.positions[index[:, 2]].numpy(),
            }
        )
        frame = with_head_labels(frame)
        for name, value in cols.items():
            frame[name] = value.reshape(-1).double().numpy()
        return frame

    # ---- views (imported when called: views sit above this layer) ---------------------
    def view_meta_gradients(self, layer: int, head: int, n: int = 0):
        """circuitsvis view of the prompt's tokens coloured by their term, for head
        ``head`` of the model's layer ``layer`` at recorded position ``n``."""
        from icl_lens.views.meta_gradients import meta_gradient_view

        return meta_gradient_view(self, layer, head, n)

    def plot_heads(self, columns: Sequence[str] | None = None, *, ncols: int | None = None):
        """Layer x head heatmaps (a matplotlib ``Figure``) of :meth:`to_frame` columns,
        averaged over the recorded positions: by default the attention mass on
        demonstrations, the relaxation gap ``1 - cos(relaxed, softmax)``,
        ``|dW_ICL q| / |W_ZSL q|`` and, with label tokens, the ``dW_ICL q`` effect on the
        label logit difference. Any numeric column can be asked for.

        >>> from tests.models import make_model, make_tokenizer
        >>> import icl_lens as il
        >>> model, _ = make_model("gpt2")
        >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
        >>> dec = il.decompose(model, p)
        >>> fig = dec.plot_heads(["icl_norm"])
        >>> grid = fig.axes[0].images[0].get_array()
        >>> bool(abs(grid[1, 2] - dec.icl[1, 2, 0].norm()) < 1e-5)
        True
        >>> fig.savefig("heads.pdf")                      # doctest: +SKIP
        """
        from icl_lens.views.heatmaps import plot_decomposition_heads

        return plot_decomposition_heads(self.to_frame(), columns, ncols=ncols)


def _label_direction(adapter, label_tokens, scale: Tensor) -> Tensor:
    """gamma * (W_U[:, b] - W_U[:, a]) / final-norm scale, per layer and position.

    For LayerNorm models the residual is centred first; that is folded in by centring
    the direction (a centred dot product equals a dot with the centred direction)."""
    model = adapter.model
    W_U = model.W_U.detach()
    a, b = label_tokens
    direction = (W_U[:, b] - W_U[:, a]) * adapter.norm_weight(model.ln_final)
    if getattr(model.cfg, "normalization_type", "LN") in ("LN", "LNPre"):
        direction = direction - direction.mean()
    return direction[None, :] / scale[:, None]  # n_pos d_model


def _integer(value, what: str, kind: str = "an int") -> int:
    """``value`` as an int: Python and numpy integers and one-element integer tensors.
    Bools (True would read as 1), floats (1.5 would be cut to 1) and strings are
    refused."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be {kind}, got {value!r} ({type(value).__name__})")
    return int(value)


def _distinct_ints(values, what: str, example: str) -> list[int]:
    """``values`` (a list, range, array or 1-D tensor of ints) as distinct ints, in the
    order given. A repeated one is refused: it would be decomposed twice and doubled in
    every frame and sum, and the tensors' axes would no longer map one to one."""
    wrong = TypeError(f"{what} must be a list of ints, e.g. {what}={example}; got {values!r}")
    if isinstance(values, str | bytes):
        raise wrong
    try:
        items = list(values)
    except TypeError:  # an int, a 0-d tensor or array
        raise wrong from None
    out = [_integer(x, f"each of {what}") for x in items]
    if not out:
        raise ValueError(f"{what} is empty: pass at least one, or leave it out for the default")
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise ValueError(
            f"{what} {out} repeat {repeated}: a repeat would be decomposed twice and "
            f"counted twice in every frame and sum; pass each once, e.g. "
            f"{what}={list(dict.fromkeys(out))}"
        )
    return out


def _check_label_tokens(label_tokens, d_vocab: int) -> tuple[int, int]:
    """``(a, b)``: two different token ids of the vocabulary (a negative id would wrap
    around; equal ids would make every effect, logit[b] - logit[a], exactly zero)."""
    if isinstance(label_tokens, str | bytes) or not hasattr(label_tokens, "__len__"):
        raise TypeError(
            "label_tokens must be a pair of token ids (a, b), e.g. "
            f"label_tokens(model.tokenizer, spec).first; got {type(label_tokens).__name__}"
        )
    if len(label_tokens) != 2:
        raise ValueError(
            f"label_tokens must be a pair of token ids (a, b) for logit[b] - logit[a]; got "
            f"{len(label_tokens)} values"
        )
    a, b = (_integer(token, "label_tokens", "integer token ids") for token in label_tokens)
    for token in (a, b):
        if not 0 <= token < d_vocab:
            raise ValueError(
                f"label token id {token} is outside the model's vocabulary (ids 0..{d_vocab - 1})"
            )
    if a == b:
        raise ValueError(
            f"label_tokens are both token id {a}: the effect is logit[b] - logit[a], the "
            "difference of two label logits, so equal ids make every effect exactly 0; pass "
            "the ids of two different label words, e.g. label_tokens(model.tokenizer, spec).first"
        )
    return a, b


def _check_layers(layers, n_layers: int) -> list[int]:
    """The model's layer numbers to decompose (default all), each once, in 0..n-1."""
    if layers is None:
        return list(range(n_layers))
    layers = _distinct_ints(layers, "layers", f"[0, {n_layers - 1}]")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the model has {n_layers} layers, numbered "
            f"0..{n_layers - 1} (not counted from the end: the last is {n_layers - 1})"
        )
    return layers


def _knockout_hooks(adapter, prompt: Prompt, intervention: Intervention) -> list:
    """The hooks of a knockout ``intervention`` on a full forward of ``prompt``."""
    if not isinstance(intervention, Intervention):
        raise TypeError(
            "intervention must be an Intervention, e.g. icl_lens.hooks.interventions."
            f"blind(adapter); got {type(intervention).__name__}"
        )
    shape = (adapter.n_layers, adapter.n_heads)
    if tuple(intervention.knockout.shape) != shape:
        raise ValueError(
            f"intervention {intervention.name!r} is for {list(intervention.knockout.shape)} "
            f"heads; this model has {list(shape)} [n_layers, n_heads]: build it with this "
            "model's adapter"
        )
    if intervention.transplant.any():
        raise ValueError(
            f"decompose takes a knockout (blind, knockout, restore), not {intervention.name!r}: "
            "a transplant's linear term is the icl term of decompose(..., "
            "intervention=blind(adapter))"
        )
    # a knockout reads only where the demonstrations are and where the query starts
    demo = DemoKV(prompt.demo_mask.nonzero()[:, 0], prompt.query_start, (), ())
    return InterventionHooks(adapter, [intervention], demo).hooks()


def decompose(
    model,
    prompt: Prompt,
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    matrices: bool = False,
    label_tokens: tuple[int, int] | None = None,
    intervention: Intervention | None = None,
) -> Decomposition:
    """Split every head's output at ``positions`` (default: the prediction position)
    into its W_ZSL q and dW_ICL q terms.

    ``layers`` are the model's layer numbers (default all), each once; the tensors'
    layer axis follows them, and every method takes layer numbers (:meth:`index_of`).
    ``positions`` are token positions of the query, each once. ``label_tokens=(a, b)``
    (two different token ids) adds each term's direct effect on the logit difference
    ``logit[b] - logit[a]``. ``matrices=True`` also returns the d_head x d_head matrices
    W_ZSL and dW_ICL (per position).

    ``intervention`` (a knockout of :mod:`icl_lens.hooks.interventions`:
    ``blind(adapter)``, ``knockout(adapter, heads)``, ``restore(adapter, heads)``)
    decomposes the forward under it: q, z, the attention pattern and the norms' scales
    are that forward's, the demonstrations' keys and values ICL's (an intervention acts
    at the query positions only), and the terms run over the keys the model's own mask
    lets a head see. Under ``blind(adapter)`` the ``icl`` term of a head is what
    Transplant(H, linear) adds to it: dW_ICL q_t with q_t from the Blind forward.

    >>> from tests.models import make_model, make_tokenizer
    >>> from icl_lens.hooks.interventions import blind
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> dec = decompose(model, p, intervention=blind(adapt(model)))
    >>> float(dec.demo_mass.abs().max())  # Blind: no attention on the demonstrations
    0.0
    """
    adapter = adapt(model)
    check_prompts([prompt], getattr(adapter.model, "tokenizer", None))
    adapter.check_token_ids(prompt.tokens, "the prompt")
    if label_tokens is not None:
        label_tokens = _check_label_tokens(label_tokens, adapter.d_vocab)
    if prompt.n_tokens > adapter.n_ctx:
        raise ValueError(
            f"the prompt has {prompt.n_tokens} tokens ({prompt.query_start} of BOS and "
            f"demonstrations, {prompt.n_tokens - prompt.query_start} of query) but the "
            f"model's context is {adapter.n_ctx}: use fewer or shorter demonstrations"
        )
    if positions is None:
        positions = [prompt.prediction_position]
    positions = _distinct_ints(positions, "positions", f"[{prompt.prediction_position}]")
    bad = [p for p in positions if not prompt.query_start <= p < prompt.n_tokens]
    if bad:
        raise IndexError(
            f"positions {bad} are not query positions: choose from "
            f"{prompt.query_start}..{prompt.n_tokens - 1} (the query's tokens; token "
            "positions count from 0 at the first token, not from the end)"
        )
    layers = _check_layers(layers, adapter.n_layers)
    after = () if intervention is None else _knockout_hooks(adapter, prompt, intervention)
    capture = Capture(adapter, what=WHAT, layers=layers)
    pos = torch.tensor(positions, dtype=torch.long)
    post_norms = [adapter.post_attn_norm(layer) for layer in layers]
    scales: dict[str, Tensor] = {}

    def keep_scale(key):
        def hook(x, hook=None):
            scales[key] = x.detach()[0, pos.to(x.device), 0]

        return hook

    hooks_extra = [("ln_final.hook_scale", keep_scale("final"))] if label_tokens else []
    hooks_extra += [
        (adapter.name(layer, "post_norm_scale"), keep_scale(f"post{layer}"))
        for layer, norm in zip(layers, post_norms, strict=True)
        if norm is not None
    ]
    with adapter.inference():
        tokens = prompt.tokens[None].to(adapter.device)
        with adapter.model.hooks(fwd_hooks=hooks_extra):
            capture.run(tokens, positions=pos[None].to(adapter.device), hooks=after)
    g = adapter.group_size
    v_ = {key: x.float().cpu() for key, x in capture.values.items()}  # layers' devices -> cpu

    def stack(what: str) -> Tensor:  # layer [n_pos | pos] head ...
        return torch.stack([v_[what, layer][0] for layer in layers])

    q, k, v, z = (stack(w).transpose(1, 2) for w in ("q", "k", "v", "z"))  # l h [n|p] d
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    pattern = stack("pattern").transpose(1, 2)  # l h n p
    # the keys each head saw, as the model masked them (causal, sliding window)
    visible = ~torch.isneginf(stack("scores").transpose(1, 2))
    key_dot_query = torch.einsum("lhnd,lhpd->lhnp", q, k).masked_fill(~visible, 0.0)
    demo = prompt.demo_mask
    icl = torch.einsum("lhnp,lhpd->lhnd", key_dot_query * demo, v)
    zsl = torch.einsum("lhnp,lhpd->lhnd", key_dot_query * ~demo, v)

    W_ZSL = dW_ICL = None
    if matrices:
        seen = visible.float()
        dW_ICL = einops.einsum(v, k, seen * demo, "l h p a, l h p b, l h n p -> l h n a b")
        W_ZSL = einops.einsum(v, k, seen * ~demo, "l h p a, l h p b, l h n p -> l h n a b")
    W_O = torch.stack([adapter.W_O(layer).float().cpu() for layer in layers])
    b_O = torch.stack([adapter.b_O(layer).float().cpu() for layer in layers])
    post_norm = None
    if any(norm is not None for norm in post_norms):
        post_norm = torch.stack(
            [
                adapter.norm_weight(norm).float().cpu()[None, :]
                / scales[f"post{layer}"].float().cpu()[:, None]
                for layer, norm in zip(layers, post_norms, strict=True)
            ]
        )
    direction = None
    if label_tokens is not None:
        d = _label_direction(adapter, label_tokens, scales["final"]).float().cpu()
        direction = d[None].expand(len(layers), -1, -1)
    return Decomposition(
        prompt=prompt,
        layers=torch.tensor(layers),
        positions=pos,
        zsl=zsl,
        icl=icl,
        key_dot_query=key_dot_query,
        visible=visible,
        score_scale=torch.tensor([adapter.score_scale(layer) for layer in layers]),
        values=v,
        pattern=pattern,
        z=z,
        W_O=W_O,
        b_O=b_O,
        attn_out=stack("attn_out"),
        post_norm=post_norm,
        W_ZSL=W_ZSL,
        dW_ICL=dW_ICL,
        label_direction=direction,
    )
