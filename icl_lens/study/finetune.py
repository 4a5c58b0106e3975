"""The paper's finetuning baseline: K/V-only SGD on the demonstrations (method.md section 1).

Exactly as the authors' code: a copy of the model; only the key and value projections
(weights and biases) of every attention layer train; plain SGD (no momentum, no weight
decay); batch size 1; one epoch; the demonstrations in their ICL order; the causal LM
loss (mean over tokens) over every token of each formatted demonstration, i.e. the
sequence ``BOS + demonstration tokens`` (its separator included, so training tokens
align 1:1 with the demonstration tokens of the ICL prompt). The learning rate is chosen
by validation accuracy from a grid (:data:`PAPER_LR_GRID` by default).

Dropout is off during training (the model is put in eval mode), so a run is
deterministic; the caller's model is never touched (its weights stay bitwise equal).
In a half-precision model (bfloat16 / float16) the K/V weights are trained as float32
copies (the update lr * grad is often below half precision's resolution and would round
away) and written back, rounded, after each step.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    "PAPER_LR_GRID",
    "SHORT_LR_GRID",
    "BestTrial",
    "FinetuneResult",
    "FinetuneStep",
    "LrTrial",
    "finetune",
    "lr_grid",
    "search_lr",
    "select_lr",
    "training_sequences",
    "training_token_scores",
]

PAPER_LR_GRID: tuple[float, ...] = tuple(
    float(f"{m}e-{e}") for e in (4, 3, 2, 1) for m in range(1, 10)
)
"""{1..9} x {1e-4, 1e-3, 1e-2, 1e-1}, ascending: the authors' grid (36 values)."""

SHORT_LR_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
"""One value per decade of the paper's grid, for quick runs."""


def lr_grid(spec: str | float | Sequence[float]) -> tuple[float, ...]:
    """``"paper"``, ``"short"``, a number, a comma-separated list or a sequence.

    >>> lr_grid("short")
    (0.0001, 0.001, 0.01, 0.1)
    >>> lr_grid("0.1, 3e-2")
    (0.1, 0.03)
    >>> len(lr_grid("paper"))
    36
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key == "paper":
            return PAPER_LR_GRID
        if key == "short":
            return SHORT_LR_GRID
        try:
            values = tuple(float(s) for s in key.split(",") if s.strip())
        except ValueError:
            raise ValueError(
                f"learning-rate grid {spec!r}: use 'paper', 'short' or numbers like '1e-3,1e-2'"
            ) from None
    elif isinstance(spec, int | float):
        values = (float(spec),)
    else:
        values = tuple(float(s) for s in spec)
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"learning rates must be positive numbers, got {spec!r}")
    return values


def training_sequences(demonstrations: Prompt | Sequence[Tensor]) -> list[Int[Tensor, " pos"]]:
    """``BOS + demonstration tokens`` per demonstration of an ICL prompt, in its order.

    >>> from tests.models import make_tokenizer
    >>> from icl_lens.data.prompts import build_prompt
    >>> p = build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> [s.tolist() for s in training_sequences(p)]
    [[1, 4, 95, 97], [1, 5, 96, 97]]
    """
    if isinstance(demonstrations, Prompt):
        bos = demonstrations.tokens[:1]
        return [torch.cat([bos, demonstrations.tokens[s:e]]) for s, e in demonstrations.demo_spans]
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
    record_queries: bool = True,
    record_inputs: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Finetune a copy of ``model``'s K/V projections on the demonstrations, one epoch.

    ``demonstrations``: an ICL :class:`~icl_lens.data.prompts.Prompt` (its demonstrations in
    order become ``BOS + demo tokens`` sequences) or the training sequences themselves.
    A NaN/inf loss or weight marks the run diverged and stops it.
    """
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    seqs = training_sequences(demonstrations)
    if not seqs:
        raise ValueError("finetune needs at least one demonstration")
    adapter = adapt(model)
    ft_model = copy_model(model)
    ft = adapt(ft_model)
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
            if capture:
                capture.values.clear()
            logits = ft.forward(tokens, fwd_hooks=hooks)
            if capture:
                capture._finish_rotary(None)
            targets = tokens[0, 1:].to(logits.device)  # the last layer's device
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets)
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


# ---- learning-rate grid ---------------------------------------------------------------


@dataclass
class LrTrial:
    """One learning rate of the grid: validation accuracy (None if diverged), the mean
    gold-class log-prob, the training losses."""

    lr: float
    accuracy: float | None
    gold_log_prob: float | None
    diverged: bool
    losses: list[float]
    diverged_at: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def select_lr(trials: Sequence[LrTrial]) -> LrTrial:
    """The best trial: highest validation accuracy; on a tie the smallest learning rate
    (the first best of the ascending grid, the least change to the model). Diverged
    trials never win. ``gold_log_prob`` is reported, not used: a degenerate, saturated
    model can have the highest gold log-prob.

    >>> t = [LrTrial(0.2, 0.5, -1.0, False, []), LrTrial(0.1, 0.5, -2.0, False, []),
    ...      LrTrial(0.3, None, None, True, [])]
    >>> select_lr(t).lr
    0.1
    """
    ok = [t for t in trials if not t.diverged and t.accuracy is not None]
    if not ok:
        tried = ", ".join(f"{t.lr:g}" for t in trials)
        raise ValueError(
            f"every learning rate of the grid diverged (NaN/inf loss or weights): {tried}; "
            "try smaller learning rates (e.g. --lr-grid 1e-5,1e-4)"
        )
    return max(ok, key=lambda t: (t.accuracy, -t.lr))


def run_trial(
    model,
    demonstrations,
    lr: float,
    evaluate: Callable[[torch.nn.Module], object],
    *,
    keep: Callable[[FinetuneResult, LrTrial], None] | None = None,
) -> LrTrial:
    """Finetune at ``lr`` and evaluate the copy with ``evaluate(ft_model)`` (which returns
    :class:`~icl_lens.study.predict.Predictions`). ``keep(ft, trial)`` is called for a
    converged trial, with the training-token queries recorded (e.g.
    :meth:`BestTrial.offer`)."""
    ft = finetune(model, demonstrations, lr=lr, record_queries=keep is not None)
    losses = [float(x) for x in ft.losses]
    if ft.diverged:
        return LrTrial(lr, None, None, True, losses, ft.diverged_at)
    pred = evaluate(ft.model)
    scores_ok = bool(torch.isfinite(pred.scores).all())
    if not scores_ok:  # finite weights that still overflow at evaluation
        return LrTrial(lr, None, None, True, losses, None)
    trial = LrTrial(lr, pred.accuracy, pred.gold_log_prob, False, losses)
    if keep is not None:
        keep(ft, trial)
    return trial


class BestTrial:
    """The best converged trial so far (the rule of :func:`select_lr`), kept as its
    trained K/V weights and records, not as a model copy, so that the chosen learning
    rate is not trained a second time: :meth:`take` rebuilds the finetuned copy from the
    original model, bitwise equal to training it again (training is deterministic).

    >>> kept = BestTrial()
    >>> trials = [run_trial(model, prompt, lr, evaluate, keep=kept.offer)
    ...           for lr in (1e-3, 1e-2)]                               # doctest: +SKIP
    >>> ft = kept.take(model, select_lr(trials).lr)                     # doctest: +SKIP
    """

    def __init__(self):
        self._key: tuple[float, float] | None = None
        self._result: FinetuneResult | None = None
        self._kv: dict[str, Tensor] = {}

    def offer(self, ft: FinetuneResult, trial: LrTrial) -> None:
        if trial.diverged or trial.accuracy is None or ft.diverged:
            return
        key = (trial.accuracy, -trial.lr)
        if self._key is not None and key <= self._key:
            return
        params = adapt(ft.model).kv_parameters(ft.model)
        self._kv = {name: p.detach().clone() for name, p in params}
        self._result = dataclasses.replace(ft, model=None)
        self._key = key

    def take(self, model, lr: float) -> FinetuneResult | None:
        """The finetuned copy of ``model`` at ``lr`` if that is the kept trial, else None."""
        if self._result is None or self._result.lr != float(lr):
            return None
        clone = copy_model(model)
        with torch.no_grad():
            for name, p in adapt(model).kv_parameters(clone):
                p.copy_(self._kv[name])
        for p in clone.parameters():
            p.requires_grad_(False)
        clone.eval()
        return dataclasses.replace(self._result, model=clone)


def search_lr(
    model,
    demonstrations,
    evaluate: Callable[[torch.nn.Module], object],
    *,
    grid: str | Sequence[float] = "paper",
    progress: bool = False,
) -> tuple[LrTrial, list[LrTrial]]:
    """Try every learning rate of ``grid`` and return (best, all trials).

    ``evaluate(ft_model) -> Predictions`` on the validation queries; a diverged learning
    rate is recorded and the grid continues.
    """
    trials = [
        run_trial(model, demonstrations, lr, evaluate)
        for lr in tqdm(lr_grid(grid), desc="lr grid", disable=not progress, leave=False)
    ]
    return select_lr(trials), trials
