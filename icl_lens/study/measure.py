"""The four comparisons of method.md section 3, from the recordings of ZSL, ICL and FT.

:func:`measure` feeds :mod:`icl_lens.analyses` with what :func:`icl_lens.study.records.record`
and :func:`icl_lens.study.finetune.finetune` recorded, with every baseline that applies, and
:func:`control_rows` turns the same metrics computed on an untrained-weights copy of the
model into ``baseline == "untrained_weights"`` rows of the tidy frame.

>>> import torch
>>> from icl_lens.study.records import Records
>>> def rec(shift):
...     g = torch.Generator().manual_seed(shift)
...     return Records(attn_out=torch.randn(3, 2, 8, generator=g),
...                    q=torch.randn(3, 2, 2, 4, generator=g),
...                    query_scores=[torch.randn(2, 2, 4, generator=g) for _ in range(3)],
...                    demo_scores=torch.randn(3, 2, 5, generator=g),
...                    class_scores=torch.randn(3, 2, generator=g), gold=torch.tensor([0, 1, 1]),
...                    positions=torch.tensor([2, 2, 2]), prefix_length=6)
>>> m = measure(rec(0), rec(1), rec(2), torch.randn(5, 2, 2, 4), n_resamples=10)
>>> sorted(m.results), set(m.frame["metric"]) == {"rec2ftp", "simaou", "simam", "kendall"}
(['kendall', 'rec2ftp', 'simam', 'simaou'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from jaxtyping import Float
from torch import Tensor

from icl_lens import analyses
from icl_lens.study.finetune import training_token_scores
from icl_lens.study.records import Records

__all__ = ["CONTROL", "Measurement", "control_rows", "measure"]

CONTROL = "untrained_weights"
"""``baseline`` label of the rows computed on the untrained-weights copy."""


@dataclass
class Measurement:
    """The analyses' results (``results[metric]``) and their tidy frame."""

    results: dict[str, Any]
    frame: pd.DataFrame


def kendall_inputs(
    icl: Records, ft: Records, train_queries: Float[Tensor, "train_token layer head d_head"]
) -> tuple[Tensor, Tensor]:
    """(ICL demonstration scores, FT training-token scores), both ``(n, layer, tokens)``,
    for the queries whose demonstration scores were kept."""
    if icl.demo_scores is None:
        raise ValueError("the ICL recordings hold no demonstration scores")
    n = icl.demo_scores.shape[0]
    ft_scores = training_token_scores(ft.q[:n], train_queries)
    if ft_scores.shape != icl.demo_scores.shape:
        raise ValueError(
            f"{icl.demo_scores.shape[-1]} demonstration tokens in the ICL prompt but "
            f"{ft_scores.shape[-1]} training tokens in FT: they must align 1:1"
        )
    return icl.demo_scores, ft_scores


def measure(
    zsl: Records,
    icl: Records,
    ft: Records,
    train_queries: Float[Tensor, "train_token layer head d_head"],
    *,
    seed: int = 0,
    kendall_queries: int | None = 100,
    n_resamples: int = 1000,
    confidence: float = 0.95,
) -> Measurement:
    """Rec2FTP, SimAOU, SimAM and Kendall with all applicable baselines and bootstrap
    CIs over queries (seeded by ``seed``)."""
    n = len(zsl.gold)
    n_heads = zsl.q.shape[2]
    opts = {"seed": seed, "n_resamples": n_resamples, "confidence": confidence}
    many = n >= 2
    simaou_base = [
        b
        for b in ("random_uniform", "random_gaussian", "shuffled_queries")
        if many or not b.startswith("shuffled")
    ]
    simam_base = [
        b
        for b in ("random_uniform", "random_gaussian", "shuffled_heads", "shuffled_queries")
        if (b != "shuffled_queries" or many) and (b != "shuffled_heads" or n_heads >= 2)
    ]
    correct = {
        name: r.predictions.correct.numpy() for name, r in (("zsl", zsl), ("icl", icl), ("ft", ft))
    }
    icl_demo, ft_demo = kendall_inputs(icl, ft, train_queries)
    results = {
        "rec2ftp": analyses.rec2ftp(**correct, **opts),
        "simaou": analyses.simaou(
            zsl.attn_out, icl.attn_out, ft.attn_out, baselines=simaou_base, **opts
        ),
        "simam": analyses.simam(
            zsl.query_scores, icl.query_scores, ft.query_scores, baselines=simam_base, **opts
        ),
        "kendall": analyses.kendall(
            list(icl_demo), list(ft_demo), max_queries=kendall_queries, **opts
        ),
    }
    frame = analyses.results_frame(*results.values())
    return Measurement(results, frame)


def control_rows(control: Measurement) -> pd.DataFrame:
    """The observed rows of a measurement on the untrained copy, relabelled as the
    ``"untrained_weights"`` baseline."""
    frame = control.frame
    rows = frame[frame["baseline"] == analyses.OBSERVED].copy()
    rows["baseline"] = CONTROL
    return rows.reset_index(drop=True)
