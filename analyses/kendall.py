"""Kendall: does ICL rank the demonstration tokens as FT ranks its training tokens?

Per query and layer: Kendall's tau-b (``scipy.stats.kendalltau``, ``variant="b"``, so
ties are handled) between

- (a) ICL attention scores from the recorded position to each demonstration token,
  summed over heads, and
- (b) FT "attention to training tokens": the dot product of the query's FT query vector
  with the query vector recorded for each training token (aligned 1:1 with (a)).

Tau is a rank statistic: raw scores, softmax probabilities (the authors apply a softmax
first) and any other strictly increasing transform give the same value. The authors'
code uses the first 100 validation queries: ``max_queries=100`` by default.

Variants, as the authors' two levels (LMOps ``icl_ft/compute_training_example_attn.py``
199-220, the same loop at both levels):

- ``tau_b`` (token level, the paper's): over the demonstration tokens;
- ``example`` (with ``groups``, the tokens of each demonstration): each side's softmax
  over its tokens summed per demonstration, then tau-b over the demonstrations. Here the
  softmax matters (a sum of probabilities is not a rank transform), so the scores' scale
  matters, as for top-k recall's example level.

Tokens the layer cannot see (score ``-inf``: masked, e.g. outside a local layer's
sliding window; the softmax gives them no weight) are left out of both rankings: tau
is over the demonstration tokens the layer attends to on both sides (FT sees every
training token; ICL against ICL in another order can lose different tokens).

A constant vector (or one of fewer than 2 tokens) has no ranking: scipy returns NaN;
here such (query, layer) cells are skipped explicitly, stored as NaN and counted in
``n_skipped`` (the authors' code would let one NaN turn the whole mean into NaN). A layer
that sees no demonstration token at all (a query at least as long as a sliding window)
has no ICL side: its cells are left out with that reason (``undefined``).

Baselines (seeded):

- ``random_uniform`` (the paper's): tau(a, u) with u ~ U[0, 1) per query and layer.
- ``shuffled_queries``: tau(a_n, b_pi(n)) for a permutation pi of the queries without
  fixed points. Used only when every query has the same number of demonstration tokens
  (the usual case: one demonstration set per run). High values here mean the shared
  rank structure (e.g. label tokens, the first token) drives the observed tau, not the
  query.

>>> import torch
>>> icl = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 2.0, 2.0, 3.0]])]
>>> ft = [torch.tensor([[1.0, 3.0, 2.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0, 3.0]])]
>>> r = kendall(icl, ft).tau_b
>>> r.values.round(4).tolist()      # (n, layer); 2/3 by hand, 0.8 with ties
[[0.6667], [0.8]]
>>> round(r.value, 4), r.n_skipped
(0.7333, 0)
>>> masked = [torch.tensor([[-float("inf"), 2.0, 3.0, 4.0]])]  # token 0 outside the window
>>> kendall(masked, [torch.tensor([[9.0, 1.0, 2.0, 3.0]])]).tau_b.values.tolist()
[[1.0]]
>>> two = kendall(icl, ft, groups=(1, 1, 2))      # demonstrations A, B (1 token), C (2)
>>> two.example.values.round(4).tolist()          # ICL: C > B > A; FT: C > B > A
[[1.0], [1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
from jaxtyping import Float

from ._common import (
    NO_DEMONSTRATION_SEEN,
    as_query_list,
    both_seen,
    by_example,
    check_scores,
    derangement,
    rng_for,
    token_baselines,
)
from .result import MetricResult, VariantSet

DemoScores = (
    Sequence[Float[torch.Tensor, "layer n_demo_tokens"]]
    | Sequence[Float[np.ndarray, "layer n_demo_tokens"]]
)

BASELINES = ("random_uniform", "shuffled_queries")
VARIANTS = ("tau_b", "example")


@dataclass(frozen=True, eq=False)
class KendallResult(VariantSet):
    """Kendall's tau-b at token level (``tau_b``, the paper's) and, with ``groups``, at
    example level; ``values`` of each are ``(n, layer)``."""

    tau_b: MetricResult
    example: MetricResult | None = None

    @property
    def variants(self) -> dict[str, MetricResult]:
        return {k: v for k, v in super().variants.items() if v is not None}


def _tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """tau-b, or NaN (without calling scipy) where it is undefined."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.kendalltau(x, y, variant="b").statistic)


def kendall(
    icl: DemoScores,
    ft: DemoScores,
    *,
    groups: Sequence[int] | None = None,
    max_queries: int | None = 100,
    baselines: Sequence[str] | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
) -> KendallResult:
    """Kendall tau-b per query and layer (``values``: ``(n_used, layer)``), with baselines,
    at token level and (with ``groups``) example level.

    ``icl``, ``ft``: lists over queries of ``(layer, n_demo_tokens)`` scores (a
    stacked ``(n, layer, tokens)`` tensor also works). ``groups``: tokens per
    demonstration, in order (adding up to ``n_demo_tokens``). ``max_queries``: use the
    first that many queries (``None``: all). ``baselines``: ``None`` for every applicable
    one (``shuffled_queries`` only when all queries have the same shape and there are >= 2
    of them); naming ``shuffled_queries`` explicitly where it cannot apply is an error.
    """
    icl_, ft_ = as_query_list(icl, "icl"), as_query_list(ft, "ft")
    if len(icl_) != len(ft_):
        raise ValueError(f"icl and ft need one entry per query: {len(icl_)} vs {len(ft_)}")
    if max_queries is not None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}")
        icl_, ft_ = icl_[:max_queries], ft_[:max_queries]
    if not icl_:
        raise ValueError("Kendall needs at least one query")
    n_layers = icl_[0].shape[0] if icl_[0].ndim == 2 else None
    for q, (a, b) in enumerate(zip(icl_, ft_, strict=True)):
        if a.shape != b.shape or a.ndim != 2 or a.shape[0] != n_layers:
            raise ValueError(
                f"query {q}: icl {a.shape} and ft {b.shape} must both be (layer, n_demo_tokens) "
                f"with {n_layers} layers; the pipeline aligns training tokens with "
                "demonstration tokens 1:1"
            )
        check_scores(a, f"icl[{q}]")
        check_scores(b, f"ft[{q}]")
        if groups is not None and sum(groups) != a.shape[1]:
            raise ValueError(
                f"query {q}: groups add up to {sum(groups)} tokens, the scores have {a.shape[1]}"
            )
    baselines, _ = token_baselines("Kendall", icl_, baselines, BASELINES)
    opts = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    out = {"tau_b": _level("tau_b", icl_, ft_, baselines, **opts)}
    if groups is not None:
        pairs = [both_seen(a, b) for a, b in zip(icl_, ft_, strict=True)]
        icl_ex = [by_example(a, groups) for a, _ in pairs]
        ft_ex = [by_example(b, groups) for _, b in pairs]
        out["example"] = _level("example", icl_ex, ft_ex, baselines, **opts)
    return KendallResult(**out)


def _level(variant: str, icl_, ft_, baselines, *, seed: int, **opts) -> MetricResult:
    """tau-b per query and layer over the items (tokens or demonstrations) of one level."""
    n, n_layers = len(icl_), icl_[0].shape[0]
    obs = np.empty((n, n_layers))
    none_seen = np.zeros((n, n_layers), dtype=bool)
    base = {b: np.empty((n, n_layers)) for b in baselines}
    rng = rng_for(seed, "random_uniform", *((1,) if variant == "example" else ()))
    perm = (
        derangement(n, rng_for(seed, "shuffled_queries"))
        if "shuffled_queries" in baselines
        else None
    )
    for q in range(n):
        for layer in range(n_layers):
            a, b = icl_[q][layer], ft_[q][layer]
            seen = np.isfinite(a) & np.isfinite(b)  # the items this layer sees on both sides
            obs[q, layer] = _tau_b(a[seen], b[seen])
            none_seen[q, layer] = not seen.any()
            if "random_uniform" in baselines:
                base["random_uniform"][q, layer] = _tau_b(a[seen], rng.random(seen.sum()))
            if perm is not None:
                other = ft_[perm[q]][layer]
                both = np.isfinite(a) & np.isfinite(other)
                base["shuffled_queries"][q, layer] = _tau_b(a[both], other[both])
    undefined = {NO_DEMONSTRATION_SEEN: none_seen}
    return MetricResult("kendall", variant, obs, base, undefined=undefined, seed=seed, **opts)
