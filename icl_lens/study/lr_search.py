"""Choosing the FT learning rate: the grid, the rule, and what to say when it cannot choose.

The authors chose the learning rate of their FT baseline by validation accuracy from
{1..9} x {1e-1, 1e-2, 1e-3, 1e-4} (:data:`PAPER_LR_GRID`). :func:`select_lr` keeps that
rule with an explicit tie-break (the smaller rate). A rate that wins at the *edge* of the
grid says the grid did not bracket the best rate: at the small end FT may barely have
moved the model, at the large end a larger rate might do better. :func:`next_lr` proposes
the next rate past an edge whose rate reaches the best accuracy (the 1-3-10 sequence:
``1e-4 -> 3e-5 -> 1e-5``, ``3 -> 10 -> 30``) and :func:`lr_edge_flag` words the flag a
result carries when the chosen rate is still at an edge.

>>> trials = [LrTrial(1e-4, 0.8, None, False, []), LrTrial(1e-3, 0.6, None, False, [])]
>>> select_lr(trials).lr, next_lr(trials, grid=(1e-4, 1e-3), max_extra=2)
(0.0001, 3e-05)
>>> flag = lr_edge_flag(trials, grid=(1e-4, 1e-3), max_extra=0)
>>> flag[:60]
'lr 0.0001 is the smallest of the grid (0.0001..0.001): FT ma'
>>> flag[flag.index('extend'):]
'extend the grid below it, e.g. --lr-grid 1e-05,3e-05,0.0001 (or --lr-extend N / lr_extend=N)'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from icl_lens.model.adapter import ModelAdapter, adapt
from icl_lens.model.copying import copy_model
from icl_lens.study.finetune import FinetuneResult, finetune

__all__ = [
    "PAPER_LR_GRID",
    "SHORT_LR_GRID",
    "BestTrial",
    "LrTrial",
    "lr_edge",
    "lr_edge_flag",
    "lr_grid",
    "next_lr",
    "run_trial",
    "search_lr",
    "select_lr",
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
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"learning rates must be positive finite numbers, got {spec!r}")
    return values


@dataclass
class LrTrial:
    """One learning rate of the grid: selection accuracy (None if diverged), the mean
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
    (the least change to the model). Diverged trials never win. ``gold_log_prob`` is
    reported, not used: a degenerate, saturated model can have the highest gold log-prob.

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


def lr_edge(trials: Sequence[LrTrial]) -> str | None:
    """``"low"`` / ``"high"`` when the selected rate is the smallest / largest of at least
    two rates tried (diverged ones included), else None.

    >>> lr_edge([LrTrial(0.1, 0.9, None, False, []), LrTrial(1.0, None, None, True, [])])
    'low'
    """
    lrs = {t.lr for t in trials}
    if len(lrs) < 2:
        return None
    best = select_lr(trials).lr
    return "low" if best <= min(lrs) else "high" if best >= max(lrs) else None


def _one_three(v: float, direction: int) -> float:
    """The next value of the 1-3-10 sequence strictly below (-1) or above (+1) ``v``."""
    e = math.floor(math.log10(v))
    ladder = [m * 10.0**k for k in range(e - 1, e + 3) for m in (1, 3)]
    ladder = [float(f"{x:.0e}") for x in ladder]
    if direction < 0:
        return max(x for x in ladder if x < v * (1 - 1e-9))
    return min(x for x in ladder if x > v * (1 + 1e-9))


def next_lr(trials: Sequence[LrTrial], *, grid: Sequence[float], max_extra: int) -> float | None:
    """The next learning rate to try past an edge of the rates tried, or None.

    ``grid``: the rates asked for; a trial outside their range is an extension. The grid
    grows past an edge while the rate at that edge reaches the best accuracy (so a grid
    where every rate ties grows both ways), fewer than ``max_extra`` rates were added past
    that edge, and the latest of them strictly improved on every trial before it. Larger
    rates first; a diverged rate ends growth upwards. A grid of one rate is the user's
    fixed choice: never extended.

    >>> t = [LrTrial(0.1, 0.6, None, False, []), LrTrial(0.3, 0.9, None, False, [])]
    >>> next_lr(t, grid=(0.1, 0.3), max_extra=2)
    1.0
    >>> next_lr(t + [LrTrial(1.0, 0.9, None, False, [])], grid=(0.1, 0.3), max_extra=2) is None
    True
    """
    if max_extra <= 0 or len(set(grid)) < 2:
        return None
    ok = [t for t in trials if not t.diverged and t.accuracy is not None]
    if not ok:
        return None
    best = max(t.accuracy for t in ok)
    lo, hi = min(grid), max(grid)
    for direction, beyond in ((+1, lambda x: x > hi), (-1, lambda x: x < lo)):
        edge = (max if direction > 0 else min)(trials, key=lambda t: t.lr)
        if edge.diverged or edge.accuracy is None or edge.accuracy < best:
            continue
        added = [i for i, t in enumerate(trials) if beyond(t.lr)]
        if len(added) >= max_extra:
            continue
        if added:
            latest = trials[added[-1]]
            before = [
                t.accuracy for t in trials[: added[-1]] if not t.diverged and t.accuracy is not None
            ]
            if before and latest.accuracy <= max(before):
                continue
        return _one_three(edge.lr, direction)
    return None


def lr_edge_flag(trials: Sequence[LrTrial], *, grid: Sequence[float], max_extra: int) -> str | None:
    """The sentence a result carries when its selected rate sits at the edge of the rates
    tried, saying what that means and how to extend the grid; None when it is inside."""
    edge = lr_edge(trials)
    if edge is None or len(set(grid)) < 2:
        return None
    best = select_lr(trials).lr
    lrs = sorted(t.lr for t in trials)
    span = f"{lrs[0]:g}..{lrs[-1]:g}" if len(lrs) > 1 else f"{lrs[0]:g}"
    asked = {float(x) for x in grid}
    extra = sorted(t.lr for t in trials if t.lr not in asked)
    if edge == "high":
        where, meaning = "largest", "a larger rate may do better"
        more = [_one_three(lrs[-1], +1)]
        more.append(_one_three(more[0], +1))
        example = ",".join(f"{x:g}" for x in [best, *more])
        how = f"extend the grid above it, e.g. --lr-grid {example}"
    else:
        where, meaning = "smallest", "FT may barely have moved the model"
        less = [_one_three(lrs[0], -1)]
        less.insert(0, _one_three(less[0], -1))
        example = ",".join(f"{x:g}" for x in [*less, best])
        how = f"extend the grid below it, e.g. --lr-grid {example}"
    text = f"lr {best:g} is the {where} of the grid ({span}): {meaning}; "
    if extra:
        tried = ", ".join(f"{x:g}" for x in extra)
        return text + f"the grid was extended with {tried} (at most {max_extra} a side); {how}"
    return text + how + (" (or --lr-extend N / lr_extend=N)" if max_extra <= 0 else "")


def run_trial(
    model,
    demonstrations,
    lr: float,
    evaluate: Callable[[torch.nn.Module], object],
    *,
    keep: Callable[[FinetuneResult, LrTrial], None] | None = None,
    **finetune_options,
) -> LrTrial:
    """Finetune at ``lr`` and evaluate the copy with ``evaluate(ft_model)`` (which returns
    :class:`~icl_lens.study.predict.Predictions`). ``keep(ft, trial)`` is called for a
    converged trial, with the training-token queries recorded (e.g.
    :meth:`BestTrial.offer`). ``finetune_options`` go to :func:`finetune` (``mode``,
    ``separators``)."""
    ft = finetune(model, demonstrations, lr=lr, record_queries=keep is not None, **finetune_options)
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

    def __init__(self, adapter: ModelAdapter | None = None):
        self._adapter = adapter  # the original model's, passed down (else adapted here)
        self._key: tuple[float, float] | None = None
        self._result: FinetuneResult | None = None
        self._kv: dict[str, Tensor] = {}

    def offer(self, ft: FinetuneResult, trial: LrTrial) -> None:
        if trial.diverged or trial.accuracy is None or ft.diverged:
            return
        key = (trial.accuracy, -trial.lr)
        if self._key is not None and key <= self._key:
            return
        params = (self._adapter or adapt(ft.model)).kv_parameters(ft.model)
        self._kv = {name: p.detach().clone() for name, p in params}
        self._result = dataclasses.replace(ft, model=None)
        self._key = key

    def take(self, model, lr: float) -> FinetuneResult | None:
        """The finetuned copy of ``model`` at ``lr`` if that is the kept trial, else None."""
        if self._result is None or self._result.lr != float(lr):
            return None
        adapter = adapt(model)
        clone = copy_model(adapter.model)
        with torch.no_grad():
            for name, p in adapter.kv_parameters(clone):
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
    extend: int = 0,
    progress: bool = False,
    **finetune_options,
) -> tuple[LrTrial, list[LrTrial]]:
    """Try every learning rate of ``grid`` and return (best, all trials).

    ``evaluate(ft_model) -> Predictions`` on the selection queries; a diverged learning
    rate is recorded and the grid continues. ``extend``: at most that many extra rates
    past an edge where the best one sits (:func:`next_lr`).
    """
    rates = lr_grid(grid)
    trials = [
        run_trial(model, demonstrations, lr, evaluate, **finetune_options)
        for lr in tqdm(rates, desc="lr grid", disable=not progress, leave=False)
    ]
    while (lr := next_lr(trials, grid=rates, max_extra=extend)) is not None:
        trials.append(run_trial(model, demonstrations, lr, evaluate, **finetune_options))
    return select_lr(trials), trials
