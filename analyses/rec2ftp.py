"""Rec2FTP: how many of the queries that finetuning fixes does ICL fix too?

Rec2FTP = #{ZSL wrong, FT right, ICL right} / #{ZSL wrong, FT right}
(Dai et al. 2023; the paper prints it in percent, this returns a fraction).

Baseline ``"independent"``: #{ZSL wrong, ICL right} / #{ZSL wrong}, the value Rec2FTP
takes in expectation if, among the queries ZSL gets wrong, whether ICL is right has
nothing to do with whether FT is right. A Rec2FTP near this baseline says ICL is simply
accurate, not that it fixes the same queries as finetuning.

>>> r = rec2ftp(zsl=[0, 0, 0, 0, 0, 1], icl=[1, 1, 1, 0, 1, 1], ft=[1, 1, 1, 1, 0, 1])
>>> r.value, r.n_both, r.n_ft_recovered
(0.75, 3, 4)
>>> r.baselines
{'independent': 0.8}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int

from ._common import check_correctness
from .result import MetricResult

Correctness = Bool[np.ndarray, " n"] | Int[np.ndarray, " n"] | list[bool] | list[int]


@dataclass(frozen=True, eq=False)
class Rec2FTPResult:
    """Rec2FTP with its counts.

    ``value`` is NaN when ``n_ft_recovered == 0`` (FT fixes no query); the counts say
    why. ``ci`` is a bootstrap interval over queries (the ratio recomputed on each
    resample). ``per_query`` is 1/0 (ICL right/wrong) on the queries in the
    denominator and NaN elsewhere; ``result`` is the underlying :class:`MetricResult`.
    """

    value: float
    ci: tuple[float, float]
    baselines: dict[str, float]
    n_queries: int
    n_zsl_wrong: int
    n_ft_recovered: int  # ZSL wrong, FT right: the denominator
    n_icl_recovered: int  # ZSL wrong, ICL right
    n_both: int  # ZSL wrong, FT right, ICL right: the numerator
    result: MetricResult = field(repr=False)

    @property
    def per_query(self) -> Float[np.ndarray, " n"]:
        return self.result.values

    @property
    def percent(self) -> float:
        """The value as the paper prints it (e.g. 85.56)."""
        return 100.0 * self.value

    def to_frame(self) -> pd.DataFrame:
        """One row for Rec2FTP and one for the ``"independent"`` baseline
        (``layer = head = -1``; ``n_queries`` = the denominator)."""
        return self.result.to_frame()


def rec2ftp(
    zsl: Correctness,
    icl: Correctness,
    ft: Correctness,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Rec2FTPResult:
    """Rec2FTP from per-query correctness (bool or 0/1) under ZSL, ICL and FT.

    Argument names match the settings, so ``rec2ftp(**correct)`` works with a dict
    ``{"zsl": ..., "icl": ..., "ft": ...}``. Pass correctness (``pred == gold``), not
    predicted labels.
    """
    z = check_correctness(zsl, "zsl")
    i = check_correctness(icl, "icl")
    f = check_correctness(ft, "ft")
    if not len(z) == len(i) == len(f):
        raise ValueError(
            f"zsl, icl, ft must have one entry per query: {len(z)}, {len(i)}, {len(f)}"
        )
    denominator = ~z & f
    zsl_wrong = ~z
    observed = np.where(denominator, i.astype(np.float64), np.nan)
    independent = np.where(zsl_wrong, i.astype(np.float64), np.nan)
    result = MetricResult(
        "rec2ftp",
        "paper",
        observed,
        {"independent": independent},
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    return Rec2FTPResult(
        value=result.value,
        ci=result.ci,
        baselines=result.baselines,
        n_queries=len(z),
        n_zsl_wrong=int(zsl_wrong.sum()),
        n_ft_recovered=int(denominator.sum()),
        n_icl_recovered=int((zsl_wrong & i).sum()),
        n_both=int((denominator & i).sum()),
        result=result,
    )
