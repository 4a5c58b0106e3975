"""Metrics comparing in-context learning (ICL) with finetuning (FT) and zero-shot (ZSL).

The four comparisons of Dai et al. 2023 ("Why can GPT learn in-context?"), each with
the controls later work asked for (Deutch et al. 2024, Shen et al. 2024). These are
pure functions of recorded tensors: the pipeline runs the models; anything with the
right shapes works, including recordings from a randomly initialised model (the
"untrained weights" control).

==========================  ===================================================
``rec2ftp(zsl, icl, ft)``   per-query correctness -> :class:`Rec2FTPResult`
``simaou(zsl, icl, ft)``    attention outputs ``(n, layer, d_model)`` -> :class:`SimAOUResult`
``simam(zsl, icl, ft)``     lists of ``(layer, head, tokens)`` raw scores -> :class:`SimAMResult`
``kendall(icl, ft)``        lists of ``(layer, demo_tokens)`` scores -> :class:`KendallResult`
``topk_recall(icl, ft)``    the same inputs -> :class:`TopKRecallResult` (the authors')
``bootstrap_ci(values)``    percentile bootstrap over queries
``hierarchical_bootstrap``  over runs (demo sets, orders, draws), then queries
``aggregate_runs(frames)``  mean / std / min / max / n over seeds or demo orders
``results_frame(*results)`` one tidy frame from several results
``with_head_labels(frame)`` adds ``head_label``: ``L{layer}H{head}``, ``L{layer}``, ``all``
``rounding_level(eps, pos)`` below it a difference is rounding, not change (SimAM, SimAOU)
``rec2ftp_flag``,           when a value cannot speak (:mod:`.flags`)
``indistinguishable``,
``interval_flags``,
``undefined_notes``
==========================  ===================================================

Conventions shared by every result:

- Per-query values are kept (``MetricResult.values``: ``(n,)``, ``(n, layer)`` or
  ``(n, layer, head)``), with the same shape for every baseline
  (``baseline_values``). NaN marks an undefined value (a zero update vector, a
  constant ranking, a query outside Rec2FTP's denominator): it is skipped by every
  mean and counted (``n_skipped``), never averaged in. Where the metric knows why
  (a layer that sees no demonstration token, k not below the items, a change at
  rounding level), ``MetricResult.undefined`` says so and ``undefined_notes`` writes
  it beside each row.
- Summary value: mean over queries per cell, then over heads, then over layers (the
  paper's order). ``ci`` is a seeded percentile bootstrap over queries (95%).
- ``to_frame()`` is long and tidy, one row per (metric, variant, baseline, layer,
  head), columns::

      metric, variant, baseline, layer, head, value, ci_low, ci_high, n_queries, n_skipped

  ``baseline == "none"`` marks the metric itself; other rows hold a baseline computed
  under the same variant, so ``frame.pivot_table(index=[...], columns="baseline",
  values="value")`` puts each metric next to its nulls. ``layer == -1`` means "all
  layers" (the mean over them) and ``head == -1`` "all heads" (the mean over them), or
  that the metric has no such axis (SimAOU and Kendall are per layer, Rec2FTP is one
  number). Layer and head indices are 0-based.
- Variants: rec2ftp ``paper``; simaou ``normalised`` (paper), ``unnormalised``;
  simam ``after`` (paper), ``before`` (paper's reference), ``changes``; kendall
  ``tau_b`` (tokens), ``example`` (demonstrations); topk_recall ``token`` (k = 100),
  ``example`` (k = 5).
- Baselines: rec2ftp ``independent``; simaou ``random_uniform`` (paper),
  ``random_gaussian``, ``shuffled_queries``; simam ``random_uniform``,
  ``random_gaussian``, ``shuffled_heads``, ``shuffled_queries``; kendall and
  topk_recall ``random_uniform`` (paper), ``shuffled_queries``. All seeded by
  ``seed``. The pipeline adds rows computed elsewhere under the same tidy format
  (``icl_retest``, ``ft_retest``, ``untrained_weights``: ``icl_lens.study.measure``).
- Rec2FTP is a fraction (the paper prints percent: ``Rec2FTPResult.percent``).
- Each metric lives in a module of the same name (``analyses/simaou.py`` ...); the
  package attribute is the function, so write ``from icl_lens.analyses import simaou``
  (``import icl_lens.analyses.simaou as m`` also gives the function, not the module).
  ``VARIANTS`` and ``BASELINES`` below list every name per metric.

>>> import torch
>>> from icl_lens import analyses as ila
>>> out = {s: torch.randn(6, 2, 8) for s in ("zsl", "icl", "ft")}
>>> frame = ila.results_frame(ila.simaou(**out), ila.rec2ftp(zsl=[0, 1], icl=[1, 1], ft=[1, 0]))
>>> list(frame.columns) == list(ila.FRAME_COLUMNS)
True
"""

from . import kendall as _kendall
from . import simam as _simam
from . import simaou as _simaou
from . import topk_recall as _topk_recall
from ._common import ROUNDING_ULPS, rounding_level
from .flags import (
    MIN_QUERIES,
    indistinguishable,
    interval_flags,
    join_flags,
    rec2ftp_flag,
    undefined_notes,
)
from .hierarchical import HierarchicalCI, hierarchical_bootstrap, hierarchical_table
from .kendall import KendallResult, kendall
from .rec2ftp import Rec2FTPResult, rec2ftp
from .result import OBSERVED, MetricResult
from .simam import SimAMResult, simam
from .simaou import SimAOUResult, simaou
from .summary import (
    ALL,
    FRAME_COLUMNS,
    STAT_COLUMNS,
    VALUE_RANGES,
    aggregate_runs,
    bootstrap_ci,
    head_label,
    hierarchical_mean,
    results_frame,
    summary_table,
    with_head_labels,
)
from .topk_recall import TopKRecallResult, topk_recall

#: metric -> names of its variants, the paper's first.
VARIANTS = {
    "rec2ftp": ("paper",),
    "simaou": ("normalised", "unnormalised"),
    "simam": _simam.VARIANTS,
    "kendall": _kendall.VARIANTS,
    "topk_recall": _topk_recall.VARIANTS,
}
#: metric -> names of the baselines it can compute (all by default).
BASELINES = {
    "rec2ftp": ("independent",),
    "simaou": _simaou.BASELINES,
    "simam": _simam.BASELINES,
    "kendall": _kendall.BASELINES,
    "topk_recall": _topk_recall.BASELINES,
}

__all__ = [
    "ALL",
    "BASELINES",
    "VARIANTS",
    "FRAME_COLUMNS",
    "VALUE_RANGES",
    "MIN_QUERIES",
    "OBSERVED",
    "ROUNDING_ULPS",
    "STAT_COLUMNS",
    "HierarchicalCI",
    "KendallResult",
    "MetricResult",
    "Rec2FTPResult",
    "SimAMResult",
    "SimAOUResult",
    "TopKRecallResult",
    "aggregate_runs",
    "bootstrap_ci",
    "head_label",
    "hierarchical_bootstrap",
    "hierarchical_mean",
    "hierarchical_table",
    "indistinguishable",
    "interval_flags",
    "join_flags",
    "kendall",
    "rec2ftp",
    "rec2ftp_flag",
    "results_frame",
    "rounding_level",
    "simam",
    "simaou",
    "summary_table",
    "with_head_labels",
    "topk_recall",
    "undefined_notes",
]
