"""The stages of a comparison, each resumable: recordings, FT per mode, the control.

:class:`StudyRun` holds what every stage needs (the adapter, the
:class:`~icl_lens.study.plan.StudyPlan`, the checkpointed :class:`Stages`);
:func:`finetune_mode` is one FT mode's learning-rate search, its chosen model's
recordings, the metrics against ICL and the ft_retest ceiling; :func:`untrained_control`
repeats the recordings and FT on randomly initialised copies of the model.
:func:`icl_lens.compare` calls them in order and assembles the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import Tensor

from icl_lens.model.untrained import untrained_copy
from icl_lens.study.checkpoint import Stages
from icl_lens.study.finetune import finetune
from icl_lens.study.lr_search import BestTrial, LrTrial, lr_edge_flag, next_lr, run_trial, select_lr
from icl_lens.study.measure import (
    FT_RETEST,
    ICL_RETEST,
    Measurement,
    measure,
    rec2ftp_counts,
    retest_rows,
    retest_values,
    token_scores,
)
from icl_lens.study.plan import StudyPlan
from icl_lens.study.predict import predict_queries
from icl_lens.study.records import Records, record

__all__ = [
    "ModeOutcome",
    "StudyRun",
    "chosen_ft",
    "finetune_mode",
    "ft_key",
    "untrained_control",
]


def ft_key(mode: str, modes: tuple[str, ...]) -> str:
    """The accuracy / predictions key of a mode: ``"ft"`` for the first, else
    ``"ft_<mode>"``."""
    return "ft" if mode == modes[0] else f"ft_{mode}"


def _tag(mode: str) -> str:
    return "" if mode == "standard" else f"{mode}-"


@dataclass
class StudyRun:
    """One comparison in progress: ``adapter``, ``plan`` and its checkpointed ``stages``."""

    adapter: Any
    plan: StudyPlan
    stages: Stages
    progress: bool = True

    @property
    def scale(self) -> float:
        """The authors' recorded q is scaled by d_head ** -0.5, so q . q_t by 1 / d_head."""
        return 1.0 / self.adapter.d_head

    def measure_opts(self) -> dict[str, Any]:
        s = self.plan.settings
        return {
            "seed": s.seed,
            "kendall_queries": s.kendall_queries,
            "n_resamples": s.n_resamples,
            "groups": self.plan.groups,
        }

    def recordings(self, name: str, adapter, prefix: Tensor) -> Records:
        """Recordings of every query after ``prefix`` on ``adapter``'s model."""
        p = self.plan
        return record(
            adapter,
            prefix,
            p.queries,
            p.labels,
            desc=name,
            gold=p.gold,
            protocol=p.settings.protocol,
            keep_queries=p.settings.kendall_queries,
            batch_size=p.settings.batch_size,
            progress=self.progress,
        )

    def record(self, name: str, get_adapter: Callable, prefix: Tensor, *, share=False) -> Records:
        """:meth:`recordings` on ``get_adapter()`` as stage ``name`` (the adapter is made
        only if the stage is not finished; ``share``: computed once across runs on the
        same queries)."""
        return self.stages.records(
            name, lambda: self.recordings(name, get_adapter(), prefix), share=share
        )

    def icl_tokens(self, icl: Records, back: Tensor | None = None) -> Tensor:
        """ICL's demonstration scores on the compared tokens (``back``: a retest's,
        put back in the first order)."""
        tokens = token_scores(icl)
        if back is not None:
            tokens = tokens[..., back]
        return tokens if self.plan.columns is None else tokens[..., self.plan.columns]

    def ft_tokens(self, ft: dict, back: Tensor | None = None) -> Tensor:
        """FT's attention to its training tokens, on those ICL's compared tokens align
        with (``back``: trained in the other order, put back)."""
        tokens = token_scores(
            Records.from_dict(ft["records"]), ft["train_queries"], scale=self.scale
        )
        if back is not None:
            tokens = tokens[..., back]
        cols = self.plan.ft_columns
        return tokens if cols is None else tokens[..., cols]

    def train(self, name: str, get_adapter: Callable, prompt, lr: float, mode: str, reuse=None):
        """Stage ``name``: FT of ``get_adapter()``'s model on ``prompt`` at ``lr``, and the
        recordings of the finetuned copy (``reuse()``: an already trained copy, or None)."""
        p = self.plan

        def compute() -> dict:
            adapter = get_adapter()
            ft = (reuse and reuse()) or finetune(
                adapter, prompt, lr=lr, mode=mode, progress=self.progress, separators=p.separators
            )
            if ft.diverged:
                return {"diverged": True, "losses": ft.losses.tolist()}
            rec = self.recordings(name, adapter.with_model(ft.model), p.bos)
            return {
                "diverged": False,
                "losses": ft.losses.tolist(),
                "records": rec.to_dict(),
                "train_queries": ft.train_queries,
            }

        return self.stages.get(name, compute)

    def evaluate(self, ft_model):
        """Selection accuracy of a finetuned copy (on the lr-selection queries)."""
        p = self.plan
        return predict_queries(
            self.adapter.with_model(ft_model),
            p.bos,
            p.select_queries,
            p.labels,
            gold=p.select_gold,
            batch_size=p.settings.batch_size,
        )


@dataclass
class ModeOutcome:
    """One FT mode's result: its chosen learning rate and search, the FT recordings,
    the metrics against ICL (``main``), the frame parts and per-run values of every row,
    and the run-level ``flags``."""

    mode: str
    lr: float
    trials: list[LrTrial]
    edge: str | None
    ft: Records
    main: Measurement
    parts: list[pd.DataFrame]
    values: dict
    retest_accuracy: float | None = None
    flags: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.ft.accuracy,
            "lr": self.lr,
            "lr_search": [t.to_dict() for t in self.trials],
            "lr_flag": self.edge,
            "rec2ftp_counts": rec2ftp_counts(self.main.results["rec2ftp"]),
        }


def _search(run: StudyRun, mode: str) -> tuple[list[LrTrial], BestTrial]:
    """Every rate of the grid (and its extension past an edge), each a stage."""
    p, tag = run.plan, _tag(mode)
    grid, extend = p.settings.lr_values, p.settings.lr_extend
    kept = BestTrial(run.adapter)  # the chosen lr's copy is rebuilt, not trained again

    def trial(lr):
        return run_trial(
            run.adapter,
            p.ft_prompt,
            lr,
            run.evaluate,
            keep=kept.offer,
            mode=mode,
            separators=p.separators,
        ).to_dict()

    trials = [LrTrial(**run.stages.get(f"{tag}lr={lr!r}", lambda lr=lr: trial(lr))) for lr in grid]
    while (lr := next_lr(trials, grid=grid, max_extra=extend)) is not None:
        run.stages.bar.total += 1
        trials.append(LrTrial(**run.stages.get(f"{tag}lr={lr!r}", lambda lr=lr: trial(lr))))
    return trials, kept


def chosen_ft(run: StudyRun, mode: str) -> tuple[list[LrTrial], float, str | None, dict]:
    """FT in ``mode`` as the comparison runs it (its stages): the lr search, the chosen
    rate's training and its recordings. Returns the trials, the rate, the lr edge flag
    and the ``ft`` stage (``records``: the finetuned model's :class:`Records` as a
    dict, ``train_queries``, ``losses``)."""
    p, tag = run.plan, _tag(mode)
    trials, kept = _search(run, mode)
    best = select_lr(trials)
    s = p.settings
    edge = lr_edge_flag(trials, grid=s.lr_values, max_extra=s.lr_extend)
    ft = run.train(
        f"{tag}ft",
        lambda: run.adapter,
        p.ft_prompt,
        best.lr,
        mode,
        reuse=lambda: kept.take(run.adapter, best.lr),
    )
    if ft["diverged"]:  # cannot happen for a deterministic rerun of a converged trial
        raise RuntimeError(f"finetuning at the selected lr={best.lr:g} diverged on its rerun")
    return trials, best.lr, edge, ft


def finetune_mode(
    run: StudyRun,
    mode: str,
    zsl: Records,
    icl: Records,
    icl_tokens: Tensor,
    icl_retest: Measurement | None,
) -> ModeOutcome:
    """FT in ``mode``: the lr search, the chosen model's recordings, the metrics against
    ICL, and (with ``icl_retest``) both test-retest ceilings."""
    p, tag = run.plan, _tag(mode)
    trials, lr, edge, ft = chosen_ft(run, mode)
    flags = [f"{mode} FT: {edge}"] if edge else []
    ft_rec = Records.from_dict(ft["records"])
    ft_tokens = run.ft_tokens(ft)
    opts = run.measure_opts()
    main = measure(zsl, icl, ft_rec, tokens=(icl_tokens, ft_tokens), **opts)
    parts = [main.frame]
    values = {k: {(): v} for k, v in main.values().items()}
    outcome = ModeOutcome(mode, lr, trials, edge, ft_rec, main, parts, values, flags=flags)
    if icl_retest is None:
        return outcome
    parts.append(retest_rows(icl_retest, ICL_RETEST))
    values.update(retest_values(icl_retest, ICL_RETEST))
    ft2 = run.train(f"{tag}ft-retest", lambda: run.adapter, p.ft_retest_prompt, lr, mode)
    if ft2["diverged"]:
        flags.append(f"{mode} FT: no ft_retest, training in the other order diverged")
        return outcome
    ft2_rec = Records.from_dict(ft2["records"])
    ft2_tokens = run.ft_tokens(ft2, back=p.retest_back(ft=True))
    ft_rt = measure(zsl, ft_rec, ft2_rec, tokens=(ft_tokens, ft2_tokens), baselines=False, **opts)
    parts.append(retest_rows(ft_rt, FT_RETEST))
    values.update(retest_values(ft_rt, FT_RETEST))
    outcome.retest_accuracy = ft2_rec.accuracy
    return outcome


def untrained_control(
    run: StudyRun, lrs: dict[str, float]
) -> tuple[dict[str, Any], dict[str, list[Measurement]]]:
    """The untrained-weights control: ZSL, ICL and FT (at the real model's learning rate
    ``lrs[mode]``) on ``n_draws`` random initialisations; returns the run information and
    each mode's measurements, one per draw whose FT converged."""
    p, s = run.plan, run.plan.settings
    modes = tuple(lrs)
    seeds = [s.control_seed + i for i in range(s.n_draws)]
    info: dict[str, Any] = {"n_draws": s.n_draws, "seeds": seeds, "lr": dict(lrs), "draws": []}
    by_mode: dict[str, list[Measurement]] = {m: [] for m in modes}
    opts = run.measure_opts()
    for seed in seeds:
        untrained = functools.cache(
            lambda seed=seed: run.adapter.with_model(untrained_copy(run.adapter, seed=seed))
        )
        c_tag = f"control-{seed - s.control_seed}-"
        c_zsl = run.record(c_tag + "zsl", untrained, p.bos, share=True)
        c_icl = run.record(c_tag + "icl", untrained, p.prefix)
        draw = {"seed": seed, "accuracy": {"zsl": c_zsl.accuracy, "icl": c_icl.accuracy}}
        draw["ft_diverged"] = {}
        c_icl_tokens = run.icl_tokens(c_icl)
        for mode in modes:
            c_ft = run.train(c_tag + _tag(mode) + "ft", untrained, p.ft_prompt, lrs[mode], mode)
            draw["ft_diverged"][mode] = c_ft["diverged"]
            if c_ft["diverged"]:
                continue
            c_ft_rec = Records.from_dict(c_ft["records"])
            draw["accuracy"][ft_key(mode, modes)] = c_ft_rec.accuracy
            c_ft_tokens = run.ft_tokens(c_ft)
            by_mode[mode].append(
                measure(
                    c_zsl,
                    c_icl,
                    c_ft_rec,
                    tokens=(c_icl_tokens, c_ft_tokens),
                    baselines=False,
                    **opts,
                )
            )
        info["draws"].append(draw)
        del untrained
    return info, by_mode
