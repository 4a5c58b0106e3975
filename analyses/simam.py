"""SimAM: are ICL's attention scores closer to finetuning's than to zero-shot's?

Per query, layer and head, with the raw pre-softmax scores s from the recorded position
to the query-side tokens (ICL: demonstration columns excluded, so all three settings
have the same length for a query):

- ``after`` (the paper's SimAM): cos(s_ICL, s_FT).
- ``before`` (the paper's reference): cos(s_ICL, s_ZSL). The paper's claim is
  after > before.
- ``changes`` (stricter, Deutch et al. 2024): cos(s_ICL - s_ZSL, s_FT - s_ZSL): do ICL
  and FT change the scores the same way? ``after`` can be high just because both stay
  close to ZSL.

Tokens a setting's head cannot see (score ``-inf``: masked, e.g. BOS outside a local
layer's sliding window behind the demonstrations) are left out of every vector of that
(query, layer, head), baselines included: the cosines are over the query-side tokens
all three settings attend to.

Summary: mean over queries for each (layer, head), then over heads, then over layers
(equal to the plain mean when nothing is skipped). A zero vector gives NaN, skipped and
counted. Under ``changes``, a difference at rounding level is no change (e.g. on a
rotary model ICL cannot change layer 0's scores to the query's own tokens: they differ
from ZSL's by a few ulps, whose direction is noise): where s_ICL or s_FT is within
``rounding`` of s_ZSL (:func:`~icl_lens.analyses._common.rounding_level`, relative to
the vectors' norm), the value and its baselines are NaN and ``undefined`` says why.

Baselines, for each variant cos(a, b) (a = first argument above), seeded:

- ``random_uniform``: cos(a, u), u ~ U[0, 1) (the paper's kind of random vector).
- ``random_gaussian``: cos(a, g), g ~ N(0, 1).
- ``shuffled_heads``: cos(a[l, h], b[l, pi(h)]) with pi a random permutation of the
  heads without fixed points, drawn per query and layer: is the similarity specific to
  the head, or shared by all heads of the layer (e.g. a common positional pattern)?
- ``shuffled_queries``: cos(a_n, b_pi(n)) with pi a permutation of the queries without
  fixed points. Lengths differ between queries, so both vectors are aligned at the
  recorded position and zero-padded on the left, as the authors' code pads: only the
  overlapping last tokens enter the dot product, each full vector enters its norm.

>>> import torch
>>> zsl = [torch.tensor([[[1.0, 0.0, 0.0]]])]   # one query, 1 layer, 1 head, 3 tokens
>>> icl = [torch.tensor([[[1.0, 1.0, 0.0]]])]
>>> ft = [torch.tensor([[[1.0, 0.0, 1.0]]])]
>>> r = simam(zsl, icl, ft, baselines=())
>>> round(r.after.value, 4), round(r.before.value, 4), round(r.changes.value, 4)
(0.5, 0.7071, 0.0)
>>> r.after.per_head.shape        # (layer, head) means over queries
(1, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from ._common import (
    ROUNDING_NOTE,
    as_query_list,
    check_scores,
    cosine,
    derangement,
    per_query_rounding,
    rng_for,
    within_rounding,
)
from .result import MetricResult, VariantSet

Scores = (
    Sequence[Float[torch.Tensor, "layer head n_query_tokens"]]
    | Sequence[Float[np.ndarray, "layer head n_query_tokens"]]
)

BASELINES = ("random_uniform", "random_gaussian", "shuffled_heads", "shuffled_queries")
VARIANTS = ("after", "before", "changes")


@dataclass(frozen=True, eq=False)
class SimAMResult(VariantSet):
    """SimAM in its three variants; ``values`` of each are ``(n, layer, head)``."""

    after: MetricResult
    before: MetricResult
    changes: MetricResult


def _pairs(z: np.ndarray, i: np.ndarray, f: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"after": (i, f), "before": (i, z), "changes": (i - z, f - z)}


def _right_aligned_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of two (..., T_a) and (..., T_b) vectors zero-padded on the left."""
    t = min(a.shape[-1], b.shape[-1])
    num = np.sum(a[..., a.shape[-1] - t :] * b[..., b.shape[-1] - t :], axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return np.clip(out, -1.0, 1.0, out=out)


def _seen_by_all(*scores: np.ndarray) -> np.ndarray:
    """Tokens every setting attends to (no -inf); zeroing the others in every vector
    removes them from dot products and norms alike."""
    return np.logical_and.reduce([np.isfinite(x) for x in scores])


def _check_inputs(zsl: list, icl: list, ft: list) -> tuple[int, int, int]:
    if not len(zsl) == len(icl) == len(ft):
        raise ValueError(
            f"zsl, icl, ft need one entry per query: {len(zsl)}, {len(icl)}, {len(ft)}"
        )
    if not zsl:
        raise ValueError("SimAM needs at least one query")
    n_layers, n_heads = zsl[0].shape[:2] if zsl[0].ndim == 3 else (None, None)
    for q, (z, i, f) in enumerate(zip(zsl, icl, ft, strict=True)):
        if not z.shape == i.shape == f.shape:
            raise ValueError(
                f"query {q}: zsl {z.shape}, icl {i.shape}, ft {f.shape} differ; the ICL scores "
                "must exclude the demonstration columns so all three cover the same tokens"
            )
        if z.ndim != 3 or z.shape[:2] != (n_layers, n_heads) or z.shape[2] < 1:
            raise ValueError(
                f"query {q}: expected (layer, head, n_query_tokens) = ({n_layers}, {n_heads}, "
                f">=1), got {z.shape}"
            )
        for name, x in (("zsl", z), ("icl", i), ("ft", f)):
            check_scores(x, f"{name}[{q}]")
    return len(zsl), int(n_layers), int(n_heads)


def simam(
    zsl: Scores,
    icl: Scores,
    ft: Scores,
    *,
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    rounding: float | Sequence[float] | np.ndarray | None = None,
) -> SimAMResult:
    """SimAM per query, layer and head in the variants after / before / changes.

    ``zsl``, ``icl``, ``ft``: lists over queries of ``(layer, head, n_query_tokens)``
    raw scores (lengths may differ between queries, not between settings of a query);
    a stacked ``(n, layer, head, tokens)`` tensor also works. ``simam(**scores)`` works
    with a dict keyed by setting. ``baselines``: any of ``BASELINES``;
    ``shuffled_heads`` needs >= 2 heads, ``shuffled_queries`` >= 2 queries.
    ``rounding``: the scores' relative rounding level, one number or one per query
    (:func:`~icl_lens.analyses.rounding_level`; default: ``ROUNDING_ULPS`` ulps of the
    inputs' dtype); a change within it is undefined under ``changes``.
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown SimAM baselines {sorted(unknown)}; choose from {BASELINES}")
    zsl_, icl_, ft_ = (
        as_query_list(x, name) for name, x in (("zsl", zsl), ("icl", icl), ("ft", ft))
    )
    n, n_layers, n_heads = _check_inputs(zsl_, icl_, ft_)
    if "shuffled_heads" in baselines and n_heads < 2:
        raise ValueError("the shuffled_heads baseline needs at least 2 heads")
    if "shuffled_queries" in baselines and n < 2:
        raise ValueError("the shuffled_queries baseline needs at least 2 queries")

    obs = {v: np.empty((n, n_layers, n_heads)) for v in VARIANTS}
    base = {v: {b: np.empty((n, n_layers, n_heads)) for b in baselines} for v in VARIANTS}
    rngs = {b: rng_for(seed, b) for b in baselines}
    query_perm = (
        derangement(n, rngs["shuffled_queries"]) if "shuffled_queries" in baselines else None
    )

    level = per_query_rounding(rounding, n, zsl, icl, ft)
    seen = [_seen_by_all(zsl_[q], icl_[q], ft_[q]) for q in range(n)]
    zsl_, icl_, ft_ = (
        [np.where(s, x, 0.0) for s, x in zip(seen, xs, strict=True)] for xs in (zsl_, icl_, ft_)
    )
    # (layer, head) per query: ICL's / FT's scores equal ZSL's up to rounding
    same_a = [within_rounding(icl_[q], zsl_[q], level[q]) for q in range(n)]
    same_b = [within_rounding(ft_[q], zsl_[q], level[q]) for q in range(n)]
    for q in range(n):
        pairs = _pairs(zsl_[q], icl_[q], ft_[q])
        shape = zsl_[q].shape
        rand = {}
        if "random_uniform" in baselines:
            rand["random_uniform"] = rngs["random_uniform"].random(shape) * seen[q]
        if "random_gaussian" in baselines:
            rand["random_gaussian"] = rngs["random_gaussian"].standard_normal(shape) * seen[q]
        if "shuffled_heads" in baselines:
            head_perm = np.stack(
                [derangement(n_heads, rngs["shuffled_heads"]) for _ in range(n_layers)]
            )
        if query_perm is not None:
            other = _pairs(zsl_[query_perm[q]], icl_[query_perm[q]], ft_[query_perm[q]])
        for v, (a, b) in pairs.items():
            obs[v][q] = cosine(a, b)
            for name, r in rand.items():
                base[v][name][q] = cosine(a, r)
            if "shuffled_heads" in baselines:
                b_shuffled = np.take_along_axis(b, head_perm[:, :, None], axis=1)
                base[v]["shuffled_heads"][q] = cosine(a, b_shuffled)
            if query_perm is not None:
                base[v]["shuffled_queries"][q] = _right_aligned_cosine(a, other[v][1])
        # changes: a side at rounding level has no direction, in every pairing it enters
        obs["changes"][q][same_a[q] | same_b[q]] = np.nan
        for name in rand:
            base["changes"][name][q][same_a[q]] = np.nan
        if "shuffled_heads" in baselines:
            moved = np.take_along_axis(same_b[q], head_perm, axis=1)
            base["changes"]["shuffled_heads"][q][same_a[q] | moved] = np.nan
        if query_perm is not None:
            base["changes"]["shuffled_queries"][q][same_a[q] | same_b[query_perm[q]]] = np.nan

    opts = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    undefined = {v: {} for v in VARIANTS}
    undefined["changes"] = {ROUNDING_NOTE: np.stack(same_a) | np.stack(same_b)}
    return SimAMResult(
        **{
            v: MetricResult("simam", v, obs[v], base[v], undefined=undefined[v], **opts)
            for v in VARIANTS
        }
    )
