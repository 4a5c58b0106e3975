"""The comparisons of method.md section 3, from the recordings of two settings and ZSL.

:func:`measure` feeds :mod:`icl_lens.analyses` with what
:func:`icl_lens.study.records.record` and :func:`icl_lens.study.finetune.finetune`
recorded: Rec2FTP, SimAOU, SimAM, Kendall and the authors' top-k recall, with every
baseline that applies. The pair it compares is ICL (``a``) with FT (``b``); the same
function measures a setting against itself for the test-retest ceilings
(:func:`retest_rows`: ICL vs ICL with the demonstrations in another order, FT vs FT
trained in another order), and :func:`control_rows` turns measurements on
untrained-weights copies (several draws) into ``baseline == "untrained_weights"`` rows,
their mean over draws with a bootstrap over draws, then queries.

Kendall and top-k recall read token scores: ``a`` attention from the recorded position
to each demonstration token (ICL; summed over heads) and ``b`` attention to training
tokens (FT; ``q_FT . q_t`` summed over heads), aligned token by token. :func:`token_scores`
builds them.

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
>>> sorted(m.results)
['kendall', 'rec2ftp', 'simam', 'simaou', 'topk_recall']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens import analyses
from icl_lens.study.finetune import training_token_scores
from icl_lens.study.records import Records

__all__ = [
    "CONTROL",
    "FT_RETEST",
    "ICL_RETEST",
    "Measurement",
    "control_rows",
    "control_values",
    "draw_spread",
    "flagged_frame",
    "mean_accuracy",
    "rec2ftp_counts",
    "retest_values",
    "kendall_inputs",
    "measure",
    "retest_rows",
    "rounding_levels",
    "token_scores",
]

CONTROL = "untrained_weights"
"""``baseline`` label of the rows computed on untrained-weights copies."""
ICL_RETEST = "icl_retest"
"""``baseline`` label of ICL vs ICL with the same demonstrations in another order."""
FT_RETEST = "ft_retest"
"""``baseline`` label of FT vs FT trained on the same demonstrations in another order."""

NOT_A_COMPARISON = {("simam", "before")}
"""Variants that do not compare the pair (SimAM before is ICL vs ZSL): no retest rows."""

TOPK = {"k": 100, "k_example": 5}
"""The authors' top-k: 100 tokens, 5 demonstrations."""


@dataclass
class Measurement:
    """The analyses' results (``results[metric]``) and their tidy frame."""

    results: dict[str, Any]
    frame: pd.DataFrame

    def values(self) -> dict[tuple[str, str, str], np.ndarray]:
        """Per-query values of every (metric, variant, baseline) row, ``"none"`` for the
        metric itself (the inputs of a bootstrap over several measurements)."""
        out = {}
        for metric, result in self.results.items():
            result = getattr(result, "result", result)  # Rec2FTPResult wraps one
            variants = getattr(result, "variants", None) or {result.variant: result}
            for variant, r in variants.items():
                out[metric, variant, analyses.OBSERVED] = r.values
                for name, v in r.baseline_values.items():
                    out[metric, variant, name] = v
        return out


def token_scores(
    setting: Records,
    train_queries: Float[Tensor, "train_token layer head d_head"] | None = None,
    *,
    columns: Int[Tensor, " token"] | None = None,
    scale: float = 1.0,
) -> Float[Tensor, "n_kept layer token"]:
    """Kendall / top-k inputs of one setting for the queries whose inputs were kept: its
    demonstration scores (ICL: ``train_queries`` None) or its attention to training tokens
    (FT: ``q . q_t`` over the given training-token queries, times ``scale``), the token
    axis indexed by ``columns`` (e.g. separators left out, or tokens put back in another
    order)."""
    if train_queries is None:
        if setting.demo_scores is None:
            raise ValueError("these recordings hold no demonstration scores (not an ICL run)")
        scores = setting.demo_scores
    else:
        scores = training_token_scores(setting.q, train_queries) * scale
    return scores if columns is None else scores[..., columns]


def kendall_inputs(
    icl: Records,
    ft: Records,
    train_queries: Float[Tensor, "train_token layer head d_head"],
    *,
    columns: Int[Tensor, " token"] | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(ICL demonstration scores, FT training-token scores), both ``(n, layer, tokens)``,
    for the queries whose demonstration scores were kept; ``columns``: the demonstration
    tokens that were trained on (all by default)."""
    a = token_scores(icl, columns=columns)
    b = token_scores(ft, train_queries, scale=scale)[: a.shape[0]]
    if a.shape != b.shape:
        raise ValueError(
            f"{a.shape[-1]} demonstration tokens in the ICL prompt but {b.shape[-1]} "
            "training tokens in FT: they must align 1:1"
        )
    return a, b


def rounding_levels(*settings: Records) -> Float[np.ndarray, " n"]:
    """Per query, the relative rounding level of these settings' recordings
    (:func:`icl_lens.analyses.rounding_level`): the least precise dtype among the model's
    and float32 (the recordings' own), at the furthest absolute recorded position."""
    eps = max(torch.finfo(getattr(torch, r.dtype)).eps for r in settings)
    eps = max(eps, torch.finfo(torch.float32).eps)
    position = np.max([r.prefix_length + r.positions.numpy() for r in settings], axis=0)
    return analyses.rounding_level(eps, position)


def _baselines(n: int, n_heads: int, names: Sequence[str]) -> list[str]:
    return [
        b
        for b in names
        if (b != "shuffled_queries" or n >= 2) and (b != "shuffled_heads" or n_heads >= 2)
    ]


def measure(
    zsl: Records,
    icl: Records,
    ft: Records,
    train_queries: Float[Tensor, "train_token layer head d_head"] | None = None,
    *,
    tokens: tuple[Tensor, Tensor] | None = None,
    groups: Sequence[int] | None = None,
    baselines: bool = True,
    seed: int = 0,
    kendall_queries: int | None = 100,
    n_resamples: int = 1000,
    confidence: float = 0.95,
) -> Measurement:
    """Rec2FTP, SimAOU, SimAM, Kendall and top-k recall of ``icl`` (the ``a`` side) vs
    ``ft`` (``b``), with all applicable baselines (none with ``baselines=False``; Rec2FTP
    always has its independent one) and bootstrap CIs over queries (seeded by ``seed``).

    Token scores for Kendall and top-k: ``tokens=(a, b)``, aligned (:func:`token_scores`),
    or FT's ``train_queries`` against all of ICL's demonstration tokens. ``groups``:
    tokens per demonstration, for top-k recall at the example level.

    The frame's ``flag`` column says why values were left out (:func:`~icl_lens.analyses.
    undefined_notes`): a change at rounding level (:func:`rounding_levels`), a layer
    that sees no demonstration token, a top-k with k not below the items.
    """
    n = len(zsl.gold)
    n_heads = zsl.q.shape[2]
    opts = {"seed": seed, "n_resamples": n_resamples, "confidence": confidence}
    simaou_base = _baselines(n, n_heads, analyses.BASELINES["simaou"]) if baselines else []
    simam_base = _baselines(n, n_heads, analyses.BASELINES["simam"]) if baselines else []
    correct = {
        name: r.predictions.correct.numpy() for name, r in (("zsl", zsl), ("icl", icl), ("ft", ft))
    }
    if tokens is None:
        if train_queries is None:
            raise ValueError("measure needs the FT training-token queries or token scores")
        tokens = kendall_inputs(icl, ft, train_queries)
    a_tok, b_tok = tokens
    token_base = None if baselines else ()
    rounding = rounding_levels(zsl, icl, ft)
    results = {
        "rec2ftp": analyses.rec2ftp(**correct, **opts),
        "simaou": analyses.simaou(
            zsl.attn_out,
            icl.attn_out,
            ft.attn_out,
            baselines=simaou_base,
            rounding=rounding,
            **opts,
        ),
        "simam": analyses.simam(
            zsl.query_scores,
            icl.query_scores,
            ft.query_scores,
            baselines=simam_base,
            rounding=rounding,
            **opts,
        ),
        "kendall": analyses.kendall(
            list(a_tok),
            list(b_tok),
            groups=groups,
            max_queries=kendall_queries,
            baselines=token_base,
            **opts,
        ),
        "topk_recall": analyses.topk_recall(
            list(a_tok),
            list(b_tok),
            groups=groups,
            max_queries=kendall_queries,
            baselines=token_base,
            **TOPK,
            **opts,
        ),
    }
    frame = analyses.results_frame(*results.values())
    notes = analyses.undefined_notes(*results.values()).to_numpy()
    frame["flag"] = pd.Series(notes, index=frame.index, dtype=object)
    return Measurement(results, frame)


def retest_rows(measured: Measurement, label: str) -> pd.DataFrame:
    """The observed rows of a setting measured against itself, relabelled ``label``
    (``"icl_retest"`` / ``"ft_retest"``); variants that do not compare the pair dropped."""
    frame = measured.frame
    rows = frame[frame["baseline"] == analyses.OBSERVED].copy()
    keep = [
        (m, v) not in NOT_A_COMPARISON for m, v in zip(rows["metric"], rows["variant"], strict=True)
    ]
    rows = rows[keep]
    rows["baseline"] = label
    return rows.reset_index(drop=True)


def control_rows(
    draws: Sequence[Measurement],
    *,
    seed: int = 0,
    n_resamples: int = 1000,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """``"untrained_weights"`` rows from measurements on untrained copies (one per random
    draw): per metric, variant and cell the mean over draws, with a bootstrap interval
    over draws, then queries (:func:`~icl_lens.analyses.hierarchical_table`)."""
    if not draws:
        raise ValueError("control_rows needs at least one measurement")
    per_draw = [d.values() for d in draws]
    parts = []
    for key in per_draw[0]:
        metric, variant, baseline = key
        if baseline != analyses.OBSERVED:
            continue
        runs = {(i,): np.asarray(v[key]) for i, v in enumerate(per_draw)}
        table = analyses.hierarchical_table(
            runs,
            seed=seed,
            n_resamples=n_resamples,
            confidence=confidence,
            bounds=analyses.VALUE_RANGES.get(metric),
        )
        table.insert(0, "baseline", CONTROL)
        table.insert(0, "variant", variant)
        table.insert(0, "metric", metric)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)[list(analyses.FRAME_COLUMNS)]


def draw_spread(draws: Sequence[Measurement]) -> dict[str, dict[str, dict[str, float]]]:
    """Per metric and variant, the overall value of each draw and their mean, sample
    standard deviation, min and max (for results.json)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for d in draws:
        f = d.frame
        rows = f[(f["baseline"] == analyses.OBSERVED) & (f["layer"] == -1) & (f["head"] == -1)]
        for metric, variant, value in zip(
            rows["metric"], rows["variant"], rows["value"], strict=True
        ):
            out.setdefault(metric, {}).setdefault(variant, {"draws": []})["draws"].append(
                float(value)
            )
    for variants in out.values():
        for entry in variants.values():
            v = np.array(entry["draws"], dtype=np.float64)
            ok = v[np.isfinite(v)]
            entry["mean"] = float(ok.mean()) if ok.size else float("nan")
            entry["std"] = float(ok.std(ddof=1)) if ok.size > 1 else float("nan")
            entry["min"] = float(ok.min()) if ok.size else float("nan")
            entry["max"] = float(ok.max()) if ok.size else float("nan")
    return out


def rec2ftp_counts(r2) -> dict[str, int]:
    return {
        "n_zsl_wrong": r2.n_zsl_wrong,
        "n_ft_recovered": r2.n_ft_recovered,
        "n_icl_recovered": r2.n_icl_recovered,
        "n_both": r2.n_both,
    }


def retest_values(measured, label: str) -> dict:
    """A retest measurement's per-query values under its baseline label."""
    return {
        (m, v, label): {(): x}
        for (m, v, b), x in measured.values().items()
        if b == analyses.OBSERVED and (m, v) not in NOT_A_COMPARISON
    }


def control_values(draws) -> dict:
    """Per-query values of the control draws: ``{(metric, variant, CONTROL): {(i,): x}}``."""
    out: dict = {}
    for i, d in enumerate(draws):
        for (m, v, b), x in d.values().items():
            if b == analyses.OBSERVED:
                out.setdefault((m, v, CONTROL), {})[(i,)] = x
    return out


def mean_accuracy(draws: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for d in draws for k in d["accuracy"])
    return {
        k: float(np.mean([d["accuracy"][k] for d in draws if k in d["accuracy"]])) for k in keys
    }


def flagged_frame(frames, rec2ftp_results) -> pd.DataFrame:
    """All rows with their FT mode, and the ``flag`` column: Rec2FTP's own reason where it
    cannot speak, why values were left out (the parts' own ``flag``, from :func:`measure`),
    an interval from too few queries, and overlap with a shuffled pairing or independent
    baseline."""
    parts = []
    for mode, mode_parts in frames:
        f = pd.concat(mode_parts, ignore_index=True)
        notes = f.pop("flag") if "flag" in f else pd.Series(None, index=f.index, dtype=object)
        f["ft_mode"] = mode
        note = analyses.rec2ftp_flag(rec2ftp_results[mode])
        own = pd.Series([None] * len(f), index=f.index, dtype=object)
        if note:
            mask = (f["metric"] == "rec2ftp") & (f["baseline"] == analyses.OBSERVED)
            own[mask] = note
        f["flag"] = analyses.join_flags(
            own, notes, analyses.interval_flags(f), analyses.indistinguishable(f)
        )
        parts.append(f)
    frame = pd.concat(parts, ignore_index=True)
    flags = [x if isinstance(x, str) else None for x in frame["flag"]]
    frame["flag"] = pd.Series(flags, index=frame.index, dtype=object)
    return frame
