"""Top-k recall: do ICL and FT attend most to the same demonstration tokens?

The authors' second analysis of "attention to training tokens" (LMOps
``understand_icl/icl_ft/compute_training_example_attn.py``, ``compute_training_attn``),
on the same inputs as Kendall: per query and layer,

- (a) ICL attention scores from the recorded position to each demonstration token,
  summed over heads, and
- (b) FT attention to training tokens (aligned 1:1 with (a)),

each turned into a distribution by a softmax over the tokens, then

    recall = |top_k(a) & top_k(b)| / k

(the share of ICL's k most attended tokens that are among FT's k most attended).
Variants, as the authors' two levels:

- ``token`` (k = 100): over tokens; the softmax does not change the ranking.
- ``example`` (k = 5): the softmax probabilities summed over each demonstration's tokens
  (``groups``: how many consecutive tokens each demonstration has), then top-5 over
  demonstrations. Here the softmax matters, so the scores' scale matters: the authors'
  ICL scores are ``q.k / sqrt(d_head)``, their FT scores ``(q / sqrt(d_head)).(q_t /
  sqrt(d_head))`` (their recorded query vectors are already scaled).

Tokens a layer did not see (``-inf`` scores: outside a local layer's sliding window, on
either side) are left out of that (query, layer) cell: top-k, the softmax and the random
draws are over the tokens both sides see; a demonstration none of whose tokens is seen
is left out of the example level; a layer that sees none (a query at least as long as
a sliding window) is left out of both. When k is not below the number of items, both
top-k sets are everything and the recall is 1 whatever the scores: such (query, layer)
cells are NaN (skipped, counted). Either way the result's ``undefined`` says why. Ties
are broken by position (a stable sort). The authors' ``np.argsort(-x)`` is numpy's
default, unstable quicksort, whose order among equal scores is unspecified (and, with
numpy's SIMD sorts, can differ between CPUs); exact ties are rare in float scores, and a
stable sort makes the value the same on every machine.

Baselines (seeded):

- ``random_uniform`` (the authors'): for each of ICL's k tokens a uniformly random token
  index is drawn instead; the share of them in FT's top k. Its expectation is k / n.
- ``shuffled_queries``: recall against FT's top k for another query (a permutation
  without fixed points), when all queries have the same number of tokens.

>>> import numpy as np
>>> icl = [np.array([[4.0, 3.0, 2.0, 1.0, 0.0]])]   # one query, one layer, 5 tokens
>>> ft = [np.array([[4.0, 0.0, 2.0, 3.0, 1.0]])]
>>> r = topk_recall(icl, ft, k=2, groups=(2, 3), k_example=1)
>>> r.token.values.tolist(), r.example.values.tolist()  # {0, 1} vs {0, 3}; {A} vs {A}
([[0.5]], [[1.0]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
from .kendall import DemoScores
from .result import MetricResult, VariantSet

BASELINES = ("random_uniform", "shuffled_queries")
VARIANTS = ("token", "example")
ITEMS = {"token": "demonstration tokens", "example": "demonstrations"}


@dataclass(frozen=True, eq=False)
class TopKRecallResult(VariantSet):
    """Top-k recall at token level (k = 100) and, with ``groups``, at example level
    (k = 5); ``values`` of each are ``(n, layer)``."""

    token: MetricResult
    example: MetricResult | None = None

    @property
    def variants(self) -> dict[str, MetricResult]:
        return {k: v for k, v in super().variants.items() if v is not None}


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, ties broken by position (stable:
    the same on every CPU, where the authors' default quicksort leaves ties unordered)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def _recall(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``(layer, items)`` arrays: |top_k(a) & top_k(b)| / k over the items
    both sides see (finite); NaN where k is not below that number."""
    seen = np.isfinite(a) & np.isfinite(b)
    ta = _top(np.where(seen, a, -np.inf), k)  # unseen items rank last
    tb = _top(np.where(seen, b, -np.inf), k)
    out = (ta[:, :, None] == tb[:, None, :]).any(-1).sum(-1) / k
    return np.where(k < seen.sum(-1), out, np.nan)


def _random_recall(a: np.ndarray, b: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The authors' random baseline: k uniformly random indices among the items both
    sides see, the share in top_k(b); no draw (NaN) for a row with none."""
    seen = np.isfinite(a) & np.isfinite(b)
    tb = _top(np.where(seen, b, -np.inf), k)
    if seen.all():
        idx = rng.integers(0, b.shape[-1], size=(b.shape[0], k))
    else:
        idx = np.stack(
            [
                np.flatnonzero(row)[rng.integers(0, row.sum(), k)]
                if row.any()
                else np.zeros(k, dtype=np.int64)
                for row in seen
            ]
        )
    out = (idx[:, :, None] == tb[:, None, :]).any(-1).sum(-1) / k
    return np.where(k < seen.sum(-1), out, np.nan)


def _undefined(a_list, b_list, k: int, variant: str) -> dict[str, np.ndarray]:
    """Why cells are NaN: (query, layer) masks of the layers that see no item, and of
    those that see some but no more than k."""
    n_seen = np.stack(
        [(np.isfinite(a) & np.isfinite(b)).sum(-1) for a, b in zip(a_list, b_list, strict=True)]
    )
    too_few = (
        f"k = {k} is not below the {ITEMS[variant]} the layer sees, so both top-k sets hold "
        "them all and the recall would be 1 whatever the scores"
    )
    return {NO_DEMONSTRATION_SEEN: n_seen == 0, too_few: (n_seen > 0) & (n_seen <= k)}


def topk_recall(
    icl: DemoScores,
    ft: DemoScores,
    *,
    k: int = 100,
    groups: Sequence[int] | None = None,
    k_example: int = 5,
    max_queries: int | None = 100,
    baselines: Sequence[str] | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
) -> TopKRecallResult:
    """Top-k recall per query and layer (``values``: ``(n_used, layer)``), with baselines.

    ``icl``, ``ft``: lists over queries of ``(layer, n_demo_tokens)`` scores, as for
    :func:`~icl_lens.analyses.kendall`. ``groups``: tokens per demonstration, in order
    (they must add up to ``n_demo_tokens``), for the example level. ``max_queries``: the
    first that many queries (the authors use 100; ``None``: all). ``baselines``: ``None``
    for every applicable one.
    """
    icl_, ft_ = as_query_list(icl, "icl"), as_query_list(ft, "ft")
    if len(icl_) != len(ft_):
        raise ValueError(f"icl and ft need one entry per query: {len(icl_)} vs {len(ft_)}")
    if k < 1 or k_example < 1:
        raise ValueError(f"k and k_example must be >= 1, got {k} and {k_example}")
    if max_queries is not None:
        icl_, ft_ = icl_[:max_queries], ft_[:max_queries]
    if not icl_:
        raise ValueError("top-k recall needs at least one query")
    n_layers = icl_[0].shape[0] if icl_[0].ndim == 2 else None
    for q, (a, b) in enumerate(zip(icl_, ft_, strict=True)):
        if a.shape != b.shape or a.ndim != 2 or a.shape[0] != n_layers:
            raise ValueError(
                f"query {q}: icl {a.shape} and ft {b.shape} must both be (layer, n_demo_tokens) "
                f"with {n_layers} layers"
            )
        check_scores(a, f"icl[{q}]")
        check_scores(b, f"ft[{q}]")
        if groups is not None and sum(groups) != a.shape[1]:
            raise ValueError(
                f"query {q}: groups add up to {sum(groups)} tokens, the scores have {a.shape[1]}"
            )
    n = len(icl_)
    baselines, shuffle_ok = token_baselines("top-k recall", icl_, baselines, BASELINES)
    perm = derangement(n, rng_for(seed, "shuffled_queries")) if shuffle_ok else None

    levels = {"token": (k, icl_, ft_)}
    if groups is not None:
        pairs = [both_seen(a, b) for a, b in zip(icl_, ft_, strict=True)]
        levels["example"] = (
            k_example,
            [by_example(a, groups) for a, _ in pairs],
            [by_example(b, groups) for _, b in pairs],
        )
    opts = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    out = {}
    for variant, (kk, a_list, b_list) in levels.items():
        rng = rng_for(seed, "random_uniform", VARIANTS.index(variant))
        obs = np.stack([_recall(a, b, kk) for a, b in zip(a_list, b_list, strict=True)])
        base = {}
        if "random_uniform" in baselines:
            base["random_uniform"] = np.stack(
                [_random_recall(a, b, kk, rng) for a, b in zip(a_list, b_list, strict=True)]
            )
        if "shuffled_queries" in baselines:
            base["shuffled_queries"] = np.stack(
                [_recall(a, b_list[perm[q]], kk) for q, a in enumerate(a_list)]
            )
        undefined = _undefined(a_list, b_list, kk, variant)
        out[variant] = MetricResult("topk_recall", variant, obs, base, undefined=undefined, **opts)
    return TopKRecallResult(**out)
