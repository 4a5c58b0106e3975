"""Small helpers shared by the metric modules (not public API).

Everything here works in float64 numpy: inputs may be torch tensors (any dtype or
device, gradients ignored) or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.special
import torch

#: Stable per-baseline stream ids, so that a baseline's random draws do not depend on
#: which other baselines were requested or in which order they run.
_STREAM_IDS = {
    "random_uniform": 1,
    "random_gaussian": 2,
    "shuffled_queries": 3,
    "shuffled_heads": 4,
}


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a tensor / array / nested list to a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy array of numbers, got {type(x).__name__}"
        ) from err


NO_DEMONSTRATION_SEEN = (
    "the layer sees no demonstration token from the recorded position (all outside its "
    "sliding window)"
)
"""Why a token-level value (Kendall, top-k recall) is undefined on a sliding-window layer
whose window, from the recorded position, holds only query tokens."""


ROUNDING_ULPS = 16
"""Units in the last place (of the recording's dtype) within which two recordings are the
same value: :func:`rounding_level`."""

ROUNDING_NOTE = (
    "no change beyond rounding: the difference from ZSL is within the recorded values' "
    "rounding level, so its direction is noise"
)
"""Why a value built on differences (SimAM ``changes``, SimAOU) is undefined."""

_ANGLE_EPS = float(torch.finfo(torch.float32).eps)


def rounding_level(eps: float, position: Any = 0) -> Any:
    """The relative size below which a difference of two recordings is rounding, not a
    change: ``ROUNDING_ULPS * eps + 2 * position * eps_float32``.

    ``eps``: the machine epsilon of the dtype the model computed in (float32 1.2e-7,
    bfloat16 7.8e-3, float16 9.8e-4); ``position``: the furthest absolute position of
    the recorded token in the two settings (one number or an array, e.g. per query).

    Why these two terms: the same query at another position (ZSL: after BOS; ICL: after
    the demonstrations) is computed with other roundings. Each value is rounded to half
    an ulp and a vector sums several such errors; and rotary angles ``position *
    frequency`` are computed in float32 in every dtype (transformers and TransformerLens
    alike), rounded to half an ulp of a number up to ``position``, so q and k each turn
    by up to ``position * eps_float32`` and a score moves by up to twice that of its
    scale. Measured at layer 0 of a random-init Gemma 3, where ICL cannot change the
    scores to the query's own tokens (nor the output of a query whose window holds no
    demonstration): in bfloat16 and float16 at most 2.6 ulps, against 16; in float32 5-30
    ulps, growing with the position (up to token 113), against 82-242. The real Gemma 3
    270M, 40 demonstrations (tokens 770-790, BOS outside layer 0's 512-token window): 7-54
    float32 ulps per head at layer 0, against 1588; layers 1 and 5 change by 0.09-0.83 of
    the scores' norm (8e5-7e6 ulps), a change of another order.

    >>> rounding_level(2.0**-7) / 2.0**-7               # bfloat16, no position: 16 ulps
    16.0
    >>> round(rounding_level(2.0**-23, 500) / 2.0**-23)  # float32 at token 500
    1016
    """
    level = ROUNDING_ULPS * eps + 2.0 * np.asarray(position, dtype=np.float64) * _ANGLE_EPS
    return float(level) if level.ndim == 0 else level


def input_eps(*xs: Any) -> float:
    """The machine epsilon of the least precise floating dtype among the inputs (tensors,
    arrays, or lists of them); float64's for anything else."""
    eps = [float(np.finfo(np.float64).eps)]
    for x in xs:
        first = x[0] if isinstance(x, list | tuple) and x else x
        dtype = getattr(first, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            eps.append(float(torch.finfo(dtype).eps))
        elif dtype is not None and np.issubdtype(dtype, np.floating):
            eps.append(float(np.finfo(dtype).eps))
    return max(eps)


def per_query_rounding(rounding: Any, n: int, *inputs: Any) -> np.ndarray:
    """``rounding`` (one relative level or one per query; None: :func:`rounding_level` of
    the inputs' dtype) as ``(n,)`` float64."""
    if rounding is None:
        rounding = rounding_level(input_eps(*inputs))
    level = np.broadcast_to(np.asarray(rounding, dtype=np.float64), (n,))
    if not np.all(level >= 0):
        raise ValueError(f"rounding must be >= 0 (a relative level), got {rounding!r}")
    return level


def within_rounding(x: np.ndarray, y: np.ndarray, level: Any) -> np.ndarray:
    """Along the last axis: ``|x - y| <= level * max(|x|, |y|)`` (Euclidean norms), i.e.
    ``x`` and ``y`` are the same recording up to rounding (two zero vectors too)."""
    diff = np.linalg.norm(x - y, axis=-1)
    scale = np.maximum(np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1))
    return diff <= level * scale


def check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{name} contains NaN or inf values; record raw finite values (e.g. scores before "
            "masking) or drop the affected queries before calling this metric"
        )


def check_scores(x: np.ndarray, name: str) -> None:
    """Attention scores: finite, or ``-inf`` where the model masked the token (e.g.
    outside a local layer's sliding window); NaN and ``+inf`` are errors."""
    if np.any(np.isnan(x) | np.isposinf(x)):
        raise ValueError(
            f"{name} contains NaN or +inf values; record raw scores (-inf marks a token "
            "the model masked) or drop the affected queries before calling this metric"
        )


def token_baselines(
    metric: str, icl: list[np.ndarray], baselines: Sequence[str] | None, known: Sequence[str]
) -> tuple[Sequence[str], bool]:
    """The baselines of a token-level metric (Kendall, top-k recall): all that apply when
    ``baselines`` is None; and whether shuffled queries apply (>= 2 queries with the same
    number of demonstration tokens)."""
    shuffle_ok = len(icl) >= 2 and len({a.shape for a in icl}) == 1
    if baselines is None:
        baselines = known if shuffle_ok else ("random_uniform",)
    unknown = set(baselines) - set(known)
    if unknown:
        raise ValueError(f"unknown {metric} baselines {sorted(unknown)}; choose from {known}")
    if "shuffled_queries" in baselines and not shuffle_ok:
        raise ValueError(
            "the shuffled_queries baseline needs >= 2 queries with the same number of "
            "demonstration tokens"
        )
    return baselines, shuffle_ok


def rng_for(seed: int, baseline: str, *extra: int) -> np.random.Generator:
    """A generator for one baseline, independent of the others for the same seed."""
    return np.random.default_rng([int(seed), _STREAM_IDS[baseline], *extra])


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (a random cyclic shift of a shuffle).

    ``perm[i] != i`` for every ``i`` when ``n >= 2``; for ``n < 2`` no such permutation
    exists and this raises ``ValueError``.
    """
    if n < 2:
        raise ValueError("shuffled pairing needs at least 2 items to pair differently")
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis; NaN where either vector is exactly zero.

    The authors' code adds 1e-20 to the denominator, which turns a zero vector into a
    cosine of 0; here a zero vector (e.g. an update that is exactly zero) is undefined
    and shows up as NaN, which the aggregations skip and count.
    """
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return np.clip(out, -1.0, 1.0, out=out)


def as_query_list(x: Any, name: str) -> list[np.ndarray]:
    """Accept a list of per-query tensors, or one stacked tensor (first axis = query)."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return [to_numpy(x[i], f"{name}[{i}]") for i in range(x.shape[0])]
    if not isinstance(x, Sequence):
        raise TypeError(f"{name}: expected a list of per-query tensors, got {type(x).__name__}")
    return [to_numpy(t, f"{name}[{i}]") for i, t in enumerate(x)]


def check_correctness(x: Any, name: str) -> np.ndarray:
    """A 1-D bool array from bool / 0-1 int correctness flags, with an actionable error."""
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-query correctness, got {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise ValueError(
                f"{name}: expected correctness flags (bool or 0/1), got values "
                f"{np.unique(arr)[:5].tolist()}; pass `pred == gold`, not predicted labels"
            )
        arr = arr.astype(bool)
    return arr


def by_example(x: np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """Softmax over the seen (finite) tokens, then the probabilities summed per group:
    ``(layer, n_groups)``; a group with no seen token is ``-inf`` (unseen)."""
    with np.errstate(invalid="ignore"):  # a row with no seen token: NaN, masked below
        p = scipy.special.softmax(x, axis=-1)
    bounds = list(zip(np.cumsum([0, *groups])[:-1], np.cumsum(groups), strict=True))
    sums = np.stack([p[:, s:e].sum(-1) for s, e in bounds], -1)
    seen = np.stack([np.isfinite(x[:, s:e]).any(-1) for s, e in bounds], -1)
    return np.where(seen, sums, -np.inf)


def both_seen(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` with every item that either side did not see at ``-inf``."""
    seen = np.isfinite(a) & np.isfinite(b)
    return np.where(seen, a, -np.inf), np.where(seen, b, -np.inf)
