"""The paper's finetuning baseline: K/V-only SGD on the demonstrations (method.md section 1).

As in the authors' code (microsoft/LMOps understand_icl; docs/method.md has the table of
every remaining difference): a copy of the model; only the key and value projections
(weights and biases) of every attention layer train; plain SGD (no momentum, no weight
decay); batch size 1; one epoch; the demonstrations in their ICL order; the causal LM
loss, mean over the next-token predictions of each training sequence. What a training
sequence holds is a choice (``separators``):

- ``separators=True`` (protocol ``"prediction"``): ``BOS + demonstration + separator``,
  so the training tokens align 1:1 with the demonstration tokens of the ICL prompt;
- ``separators=False`` (protocol ``"dai2023"``, the authors' ``get_data_for_ft``):
  ``BOS + input + label``, the separator left out.

Unlike the authors' runs (fp16 with loss scaling, ``model.train()`` with dropout 0),
training runs in the model's dtype in eval mode, so a run is deterministic; the
caller's model is never touched (its weights stay bitwise equal). In a half-precision
model (bfloat16 / float16) the K/V weights are trained as float32 copies (the update
lr * grad is often below half precision's resolution and would round away) and written
back, rounded, after each step.

``mode="layer_causal"`` is the layer-causal variant of Deutch et al. (NAACL 2024,
GiilDe/ft-vs-icl, ``--per-layer 1``): every block's input is detached, and the loss is
the sum over layers of the LM loss of each layer's residual output read through the
final norm and unembedding, so layer l's K/V learn only from layer l's own prediction,
through layer l alone; information flows upward as in ICL, errors never flow down.

Just before each update the query vectors of every training token are recorded (the
FT model's "attention to training tokens" of the Kendall comparison is the dot product
of a validation query's FT query vector with them). With ``record_inputs=True`` the
inputs x_t of the K/V projections and their errors e_t = -lr dL/d(Wx_t) are recorded
too, which makes the dual form of method.md section 2 checkable: the finetuned
projection is the original one plus linear attention over the training tokens,

    W' x + b' = W0 x + b0 + sum_t e_t (x_t . x + 1)    (the 1 only where a bias trains).

>>> import icl_lens as il
>>> from tests.models import make_model
>>> model, _ = make_model("gpt2", n_layers=1)
>>> prompt = il.build_prompt(model.tokenizer, ["w1 good", "w2 bad"], "w3", separator=" \\n")
>>> ft = finetune(model, prompt, lr=0.1)
>>> ft.losses.shape, ft.diverged, ft.train_queries.shape   # 2 steps, 6 training tokens
(torch.Size([2]), False, torch.Size([6, 1, 4, 8]))
>>> finetune(model, prompt, lr=0.1, separators=False).train_queries.shape[0]
4
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_lens.data.prompts import Prompt
from icl_lens.hooks.capture import Capture
from icl_lens.hooks.kv_taps import KVTaps
from icl_lens.model.adapter import adapt
from icl_lens.model.copying import copy_model

__all__ = [
    "FT_MODES",
    "FTMode",
    "FinetuneResult",
    "FinetuneStep",
    "finetune",
    "training_sequences",
    "training_token_scores",
]

FTMode = Literal["standard", "layer_causal"]
FT_MODES: tuple[str, ...] = ("standard", "layer_causal")
"""``standard``: the paper's FT; ``layer_causal``: Deutch et al.'s layer-causal GD."""


def training_sequences(
    demonstrations: Prompt | Sequence[Tensor], *, separators: bool = True
) -> list[Int[Tensor, " pos"]]:
    """``BOS + demonstration tokens`` per demonstration of an ICL prompt, in its order;
    with ``separators=False`` each demonstration's separator is left out (the authors'
    ``BOS + input + label``). Given sequences are returned as they are.

    >>> from tests.models import make_tokenizer
    >>> from icl_lens.data.prompts import build_prompt
    >>> p = build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> [s.tolist() for s in training_sequences(p)]
    [[1, 4, 95, 97], [1, 5, 96, 97]]
    >>> [s.tolist() for s in training_sequences(p, separators=False)]
    [[1, 4, 95], [1, 5, 96]]
    """
    if isinstance(demonstrations, Prompt):
        bos = demonstrations.tokens[:1]
        spans = demonstrations.demo_spans if separators else demonstrations.content_spans()
        return [torch.cat([bos, demonstrations.tokens[s:e]]) for s, e in spans]
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in demonstrations]
    if any(len(s) < 2 for s in seqs):
        raise ValueError("every training sequence needs BOS plus at least one token")
    return seqs


@dataclass
class FinetuneStep:
    """One SGD step (one demonstration), as seen just before its update.

    ``queries``: query vectors of the training tokens (BOS excluded).
    With ``record_inputs``: ``inputs`` x_t of the K/V projections and their errors
    ``key_errors`` / ``value_errors`` e_t = -lr * dL/d(output), all tokens incl. BOS.
    """

    tokens: Int[Tensor, " pos"]
    loss: float
    queries: Float[Tensor, "pos_minus_1 layer head d_head"] | None = None
    inputs: Float[Tensor, "layer pos d_model"] | None = None
    key_errors: Float[Tensor, "layer pos kv_head d_head"] | None = None
    value_errors: Float[Tensor, "layer pos kv_head d_head"] | None = None


@dataclass
class FinetuneResult:
    """A finetuned copy and the record of how it got there.

    ``diverged`` is True when a loss or a weight became NaN/inf (``diverged_at`` = that
    step); training stops there and ``model`` should not be used.
    """

    model: torch.nn.Module = field(repr=False)
    lr: float
    losses: Float[Tensor, " step"]
    diverged: bool
    diverged_at: int | None
    steps: list[FinetuneStep] = field(repr=False)
    kv_bias: bool = field(default=False, repr=False)

    @property
    def train_queries(self) -> Float[Tensor, "train_token layer head d_head"]:
        """Query vectors of all training tokens, in ICL order (aligned with the
        demonstration tokens of the ICL prompt)."""
        parts = [s.queries for s in self.steps if s.queries is not None]
        if not parts:
            raise ValueError("no query vectors recorded: finetune(..., record_queries=True)")
        return torch.cat(parts)

    def dual_update(
        self, layer: int, x: Float[Tensor, "*batch d_model"]
    ) -> tuple[Float[Tensor, "*batch kv_head d_head"], Float[Tensor, "*batch kv_head d_head"]]:
        """The change FT made to the key and value projections of input ``x`` in
        ``layer``, as linear attention over the recorded training inputs:
        ``sum_t e_t (x_t . x + 1)`` (the 1 where a bias trains). Needs
        ``record_inputs=True``."""
        if any(s.inputs is None for s in self.steps):
            raise ValueError("dual_update needs finetune(..., record_inputs=True)")
        xs = torch.cat([s.inputs[layer] for s in self.steps]).double()
        attn = x.double() @ xs.T + float(self.kv_bias)  # *batch, train_token
        out = []
        for name in ("key_errors", "value_errors"):
            e = torch.cat([getattr(s, name)[layer] for s in self.steps]).double()
            out.append(torch.einsum("...t,thd->...hd", attn, e))
        return out[0], out[1]


def _finite(params: list[Tensor]) -> bool:
    """No NaN or inf in any tensor: its min and max (both propagate NaN), read in place
    (K/V weights can be strided views), one sync. ``isfinite(p).all()`` wrote temporaries
    in five passes and cost ~15% of a GPT-2-small step."""
    extremes = [torch.stack((p.detach().amin(), p.detach().amax())) for p in params if p.numel()]
    if not extremes:
        return True
    device = extremes[0].device  # layers may live on several devices
    return bool(torch.isfinite(torch.cat([e.to(device) for e in extremes])).all())


HALF = (torch.float16, torch.bfloat16)


def finetune(
    model,
    demonstrations: Prompt | Sequence[Int[Tensor, " pos"]],
    *,
    lr: float,
    mode: FTMode = "standard",
    separators: bool = True,
    record_queries: bool = True,
    record_inputs: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Finetune a copy of ``model``'s K/V projections on the demonstrations, one epoch.

    ``demonstrations``: an ICL :class:`~icl_lens.data.prompts.Prompt` (its demonstrations in
    order become ``BOS + demo tokens`` sequences, without separators if
    ``separators=False``) or the training sequences themselves. ``mode``: ``"standard"``
    or ``"layer_causal"`` (module docstring). A NaN/inf loss or weight marks the run
    diverged and stops it.
    """
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if mode not in FT_MODES:
        raise ValueError(f"unknown FT mode {mode!r}; choose from {FT_MODES}")
    seqs = training_sequences(demonstrations, separators=separators)
    if not seqs:
        raise ValueError("finetune needs at least one demonstration")
    adapter = adapt(model)
    ft_model = copy_model(adapter.model)
    ft = adapter.with_model(ft_model)
    for p in ft_model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in adapter.kv_parameters(ft_model)]
    for p in params:
        p.requires_grad_(True)
    names = [n.rsplit(".", 1)[-1].lstrip("_") for n, _ in adapter.kv_parameters(ft_model)]
    kv_bias = any(n in ("bias", "b_K", "b_V") for n in names)
    ft_model.eval()  # dropout off: deterministic updates
    # float32 copies of half-precision K/V: the SGD update accumulates there
    masters = [p.detach().float() if p.dtype in HALF else None for p in params]

    capture = Capture(ft, what={"q"}) if record_queries else None
    losses, steps, diverged_at = [], [], None
    device = ft.device
    for i, seq in enumerate(
        tqdm(seqs, desc=f"finetune lr={lr:g}", disable=not progress, leave=False)
    ):
        tokens = seq[None].to(device)
        for p in params:
            p.grad = None
        taps_cm = KVTaps(ft, ft_model) if record_inputs else contextlib.nullcontext()
        with torch.enable_grad(), taps_cm as taps:
            hooks = (capture.hooks(None) if capture else []) + (taps.hooks() if taps else [])
            lens = _LayerOutputs(ft) if mode == "layer_causal" else None
            hooks += lens.hooks() if lens else []
            if capture:
                capture.values.clear()
            logits = ft.forward(tokens, fwd_hooks=hooks)
            if capture:
                capture._finish_rotary(None)
            loss = _lm_loss(logits, tokens)
            if lens:  # the last layer's term is the model's own loss
                loss = loss + sum(
                    _lm_loss(x, tokens).to(loss.device) for x in lens.logits_below_top()
                )
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                losses.append(loss_value)
                diverged_at = i
                break
            loss.backward()
        step = FinetuneStep(tokens=seq.cpu(), loss=loss_value)
        if capture:
            step.queries = torch.stack(
                [capture.values["q", la][0, 1:].float().cpu() for la in range(ft.n_layers)], dim=1
            )
        if taps:
            step.inputs, step.key_errors, step.value_errors = taps.step_record(lr)
        with torch.no_grad():  # plain SGD: no momentum, no weight decay
            for p, master in zip(params, masters, strict=True):
                if master is None:
                    p.sub_(p.grad * lr)  # overflow gives inf (-> diverged), not an error
                else:
                    p.copy_(master.sub_(p.grad.float() * lr))
        losses.append(loss_value)
        steps.append(step)
        if not _finite([m if m is not None else p for p, m in zip(params, masters, strict=True)]):
            diverged_at = i
            break
    for p in ft_model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(
        model=ft_model,
        lr=float(lr),
        losses=torch.tensor(losses, dtype=torch.float64),
        diverged=diverged_at is not None,
        diverged_at=diverged_at,
        steps=steps,
        kv_bias=kv_bias,
    )


def _lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one sequence (``[1, pos, vocab]`` logits; the
    targets follow the logits' device: layers may live on several)."""
    targets = tokens[0, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets)


class _LayerOutputs:
    """Layer-causal training (Deutch et al. 2024): hooks that detach every block's
    input, so no gradient crosses a block boundary, and keep every block's residual
    output for its own LM loss through the final norm and unembedding."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.outputs: dict[int, Tensor] = {}

    def hooks(self) -> list:
        def detach(x, hook):
            return x.detach()

        def keep(layer):
            def hook(x, hook):
                self.outputs[layer] = x

            return hook

        n = self.adapter.n_layers
        pairs = [(self.adapter.name(la, "resid_pre"), detach) for la in range(1, n)]
        return pairs + [(self.adapter.name(la, "resid_post"), keep(la)) for la in range(n - 1)]

    def logits_below_top(self) -> list[Tensor]:
        return [self.adapter.unembed_residual(x) for _, x in sorted(self.outputs.items())]


def training_token_scores(
    queries: Float[Tensor, "n layer head d_head"],
    train_queries: Float[Tensor, "train_token layer head d_head"],
) -> Float[Tensor, "n layer train_token"]:
    """The FT model's "attention to training tokens" (Kendall, method.md section 3):
    per query and layer, the dot products of its query vector (all heads) with each
    training token's query vector, i.e. summed over heads like the ICL side.

    >>> q = torch.ones(1, 1, 2, 3); t = torch.arange(12.0).reshape(2, 1, 2, 3)
    >>> training_token_scores(q, t).tolist()
    [[[15.0, 51.0]]]
    """
    return torch.einsum("nlhd,tlhd->nlt", queries.double(), train_queries.double()).float()
