"""SimAOU: do ICL and finetuning move the attention output the same way?

Per query and layer, with the attention block outputs h (after W_O, before the residual
add) at the recorded position under ZSL, ICL and FT:

- ``normalised`` (the paper's): scale each h to unit length, then
  d_ICL = h_ICL - h_ZSL, d_FT = h_FT - h_ZSL, value = cos(d_ICL, d_FT).
- ``unnormalised``: the same on the raw outputs. Normalising first can inflate the
  similarity (Deutch et al. 2024): e.g. a pure rescaling of h_ICL is no update at all
  once normalised.

Summary: mean over queries, then over layers. An update at rounding level (h_ICL or
h_FT within ``rounding`` of h_ZSL, relative to their norm, in the variant's own vectors;
:func:`~icl_lens.analyses._common.rounding_level`), exactly zero included, is no update:
its direction is noise, so the value and its baselines are undefined: NaN, skipped,
counted in ``n_skipped``, the reason in ``undefined``.

Baselines (each variant gets all of them, computed on its own updates, seeded):

- ``random_uniform`` (the paper's): cos(d_ICL, u), u ~ U[0, 1)^d per query and layer.
  It is not centred, so it is not a null for updates with a common offset.
- ``random_gaussian``: cos(d_ICL, g), g ~ N(0, I): a random direction.
- ``shuffled_queries``: cos(d_ICL[n], d_FT[pi(n)]) for a random permutation pi without
  fixed points (the same for all layers). High values here mean ICL and FT share a
  query-independent shift, which the observed SimAOU then does not show to be
  query-specific.

>>> import torch
>>> zsl = torch.randn(8, 2, 16)
>>> update = torch.randn(8, 2, 16)
>>> r = simaou(zsl, zsl + update, zsl + 2 * update)   # FT moves twice as far, same way
>>> round(r.unnormalised.value, 6)
1.0
>>> 0.9 < r.normalised.value <= 1.0
True
>>> sorted(r.normalised.baselines)
['random_gaussian', 'random_uniform', 'shuffled_queries']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from ._common import (
    ROUNDING_NOTE,
    check_finite,
    cosine,
    derangement,
    per_query_rounding,
    rng_for,
    to_numpy,
    within_rounding,
)
from .result import MetricResult, VariantSet

AttnOut = Float[torch.Tensor, "n layer d_model"] | Float[np.ndarray, "n layer d_model"]

BASELINES = ("random_uniform", "random_gaussian", "shuffled_queries")


@dataclass(frozen=True, eq=False)
class SimAOUResult(VariantSet):
    """SimAOU in both variants; ``values`` of each are ``(n, layer)``."""

    normalised: MetricResult
    unnormalised: MetricResult


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    out = np.full_like(x, np.nan)  # a zero output has no direction
    np.divide(x, norm, out=out, where=norm > 0)
    return out


def simaou(
    zsl: AttnOut,
    icl: AttnOut,
    ft: AttnOut,
    *,
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    rounding: float | Sequence[float] | np.ndarray | None = None,
) -> SimAOUResult:
    """SimAOU per query and layer, normalised (paper) and unnormalised, with baselines.

    ``zsl``, ``icl``, ``ft``: attention block outputs at the recorded position, one
    ``(n, layer, d_model)`` tensor or array per setting (so ``simaou(**attn_out)``
    works). Computed in float64, one layer at a time. ``baselines``: any of
    ``BASELINES``; ``shuffled_queries`` needs n >= 2. ``seed`` fixes the baselines and
    the bootstrap. ``rounding``: the outputs' relative rounding level, one number or one
    per query (:func:`~icl_lens.analyses.rounding_level`; default: ``ROUNDING_ULPS`` ulps
    of the inputs' dtype).
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown SimAOU baselines {sorted(unknown)}; choose from {BASELINES}")
    shapes = {name: tuple(x.shape) for name, x in (("zsl", zsl), ("icl", icl), ("ft", ft))}
    if len(set(shapes.values())) != 1 or len(shapes["zsl"]) != 3:
        raise ValueError(f"zsl, icl, ft must all be (n, layer, d_model) of one shape; got {shapes}")
    n, n_layers, _ = shapes["zsl"]
    if "shuffled_queries" in baselines and n < 2:
        raise ValueError("the shuffled_queries baseline needs at least 2 queries")

    level = per_query_rounding(rounding, n, zsl, icl, ft)
    variants = {"normalised": True, "unnormalised": False}
    obs = {v: np.empty((n, n_layers)) for v in variants}
    still = {v: np.zeros((n, n_layers), dtype=bool) for v in variants}
    base = {v: {b: np.empty((n, n_layers)) for b in baselines} for v in variants}
    rngs = {b: rng_for(seed, b) for b in ("random_uniform", "random_gaussian")}
    perm = derangement(n, rng_for(seed, "shuffled_queries")) if n >= 2 else None

    for layer in range(n_layers):
        h = {}
        for name, x in (("zsl", zsl), ("icl", icl), ("ft", ft)):
            h[name] = to_numpy(x[:, layer], name)
            check_finite(h[name], f"{name}[:, {layer}]")
        d_model = h["zsl"].shape[-1]
        # the same random directions for both variants: a paired comparison
        rand = {}
        if "random_uniform" in baselines:
            rand["random_uniform"] = rngs["random_uniform"].random((n, d_model))
        if "random_gaussian" in baselines:
            rand["random_gaussian"] = rngs["random_gaussian"].standard_normal((n, d_model))
        for variant, normalise in variants.items():
            z, i, f = (_unit(h[k]) if normalise else h[k] for k in ("zsl", "icl", "ft"))
            d_icl, d_ft = i - z, f - z
            same_a, same_b = within_rounding(i, z, level), within_rounding(f, z, level)
            still[variant][:, layer] = same_a | same_b
            obs[variant][:, layer] = np.where(same_a | same_b, np.nan, cosine(d_icl, d_ft))
            for b, r in rand.items():
                base[variant][b][:, layer] = np.where(same_a, np.nan, cosine(d_icl, r))
            if "shuffled_queries" in baselines:
                shuffled = np.where(same_a | same_b[perm], np.nan, cosine(d_icl, d_ft[perm]))
                base[variant]["shuffled_queries"][:, layer] = shuffled

    opts = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    return SimAOUResult(
        **{
            v: MetricResult(
                "simaou", v, obs[v], base[v], undefined={ROUNDING_NOTE: still[v]}, **opts
            )
            for v in variants
        }
    )
