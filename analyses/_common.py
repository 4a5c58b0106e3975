"""Small helpers shared by the metric modules (not public API).

Everything here works in float64 numpy: inputs may be torch tensors (any dtype or
device, gradients ignored) or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
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
