"""The common result type of every metric: per-query values, summary, baselines, frame.

A :class:`MetricResult` holds one metric in one variant (e.g. SimAOU, normalised):
its per-query values (NaN = undefined, skipped and counted), the same for each
baseline, and everything derived from them (summary value, bootstrap CI, per-layer and
per-head means). Metrics with several variants return a small frozen dataclass with one
:class:`MetricResult` per variant (:class:`~icl_lens.analyses.simaou.SimAOUResult`,
:class:`~icl_lens.analyses.simam.SimAMResult`).

>>> import numpy as np
>>> r = MetricResult("demo", "paper", np.array([[0.5, 0.1], [0.3, 0.1]]),
...                  {"random_uniform": np.zeros((2, 2))})
>>> round(r.value, 6), r.baselines, r.per_layer.round(6).tolist()
(0.25, {'random_uniform': 0.0}, [0.4, 0.1])
>>> r.to_frame()[["baseline", "layer", "head", "value"]].round(6)
         baseline  layer  head  value
0            none     -1    -1   0.25
1            none      0    -1   0.40
2            none      1    -1   0.10
3  random_uniform     -1    -1   0.00
4  random_uniform      0    -1   0.00
5  random_uniform      1    -1   0.00
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float

from .summary import ALL, FRAME_COLUMNS, summary_table

#: ``baseline`` column value of the rows that hold the metric itself.
OBSERVED = "none"


def _frozen(x: Any) -> np.ndarray:
    arr = np.array(x, dtype=np.float64)  # a private copy
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class MetricResult:
    """One metric in one variant, with its baselines.

    Fields given by the metric function:

    - ``metric``, ``variant``: names, e.g. ``"simaou"``, ``"normalised"``.
    - ``values``: per-query values, shape ``(n,)``, ``(n, layer)`` or
      ``(n, layer, head)``; NaN marks an undefined value (skipped, counted).
    - ``baseline_values``: baseline name -> per-query values of the same shape.
    - ``confidence``, ``n_resamples``, ``seed``: of the query bootstrap.
    - ``undefined``: why values are NaN, where the metric knows: reason (a sentence) ->
      boolean mask of ``values``' shape, True where that reason left the value out.
      :func:`~icl_lens.analyses.undefined_notes` turns them into the rows' notes.

    Derived on construction: ``value`` (mean over queries, then heads, then layers),
    ``ci`` (bootstrap interval of ``value``), ``baselines`` (name -> summary value),
    ``per_layer`` (``(layer,)`` or None), ``per_head`` (``(layer, head)`` or None),
    ``n_queries`` (queries with a defined value), ``n_skipped`` (undefined values).
    """

    metric: str
    variant: str
    values: Float[np.ndarray, "n ..."] = field(repr=False)
    baseline_values: dict[str, Float[np.ndarray, "n ..."]] = field(default_factory=dict, repr=False)
    confidence: float = field(default=0.95, repr=False)
    n_resamples: int = field(default=1000, repr=False)
    seed: int = field(default=0, repr=False)
    undefined: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    value: float = field(init=False)
    ci: tuple[float, float] = field(init=False)
    baselines: dict[str, float] = field(init=False)
    per_layer: Float[np.ndarray, " layer"] | None = field(init=False, repr=False)
    per_head: Float[np.ndarray, "layer head"] | None = field(init=False, repr=False)
    n_queries: int = field(init=False)
    n_skipped: int = field(init=False)
    _frame: pd.DataFrame = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        values = _frozen(self.values)
        if values.ndim not in (1, 2, 3):
            raise ValueError(
                f"values must be (n,), (n, layer) or (n, layer, head); got {values.shape}"
            )
        base = {}
        for name, v in self.baseline_values.items():
            base[name] = _frozen(v)
            if base[name].shape != values.shape:
                raise ValueError(
                    f"baseline {name!r} has shape {base[name].shape}, values {values.shape}"
                )
        reasons = {}
        for reason, mask in self.undefined.items():
            reasons[reason] = np.array(mask, dtype=bool)
            reasons[reason].setflags(write=False)
            if reasons[reason].shape != values.shape:
                raise ValueError(
                    f"the mask of {reason!r} has shape {reasons[reason].shape}, values "
                    f"{values.shape}"
                )
            if not np.isnan(values[reasons[reason]]).all():
                raise ValueError(f"values left out ({reason!r}) must be NaN")
        set_(self, "values", values)
        set_(self, "baseline_values", base)
        set_(self, "undefined", {k: v for k, v in reasons.items() if v.any()})

        opts = {"confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed}
        parts = []
        for name, v in [(OBSERVED, values), *base.items()]:
            table = summary_table(v, **opts)
            table.insert(0, "baseline", name)
            parts.append(table)
        frame = pd.concat(parts, ignore_index=True)
        frame.insert(0, "variant", self.variant)
        frame.insert(0, "metric", self.metric)
        frame = frame[list(FRAME_COLUMNS)]
        set_(self, "_frame", frame)

        overall = frame[(frame["layer"] == ALL) & (frame["head"] == ALL)].set_index("baseline")
        set_(self, "value", float(overall.loc[OBSERVED, "value"]))
        set_(
            self,
            "ci",
            (float(overall.loc[OBSERVED, "ci_low"]), float(overall.loc[OBSERVED, "ci_high"])),
        )
        set_(self, "baselines", {name: float(overall.loc[name, "value"]) for name in base})
        set_(self, "n_queries", int(overall.loc[OBSERVED, "n_queries"]))
        set_(self, "n_skipped", int(overall.loc[OBSERVED, "n_skipped"]))

        observed = frame[frame["baseline"] == OBSERVED]
        per_layer = per_head = None
        if values.ndim >= 2:
            rows = observed[(observed["layer"] != ALL) & (observed["head"] == ALL)]
            per_layer = _frozen(rows.sort_values("layer")["value"].to_numpy())
        if values.ndim == 3:
            rows = observed[observed["head"] != ALL].sort_values(["layer", "head"])
            per_head = _frozen(rows["value"].to_numpy().reshape(values.shape[1], values.shape[2]))
        set_(self, "per_layer", per_layer)
        set_(self, "per_head", per_head)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: ``metric, variant, baseline, layer, head, value, ci_low, ci_high,
        n_queries, n_skipped``.

        ``baseline == "none"`` rows hold the metric itself; the other rows hold a
        baseline under the same variant. ``layer == -1`` / ``head == -1`` mark the mean
        over all layers / heads (or a metric without that axis). CIs are bootstrap
        intervals over queries.
        """
        return self._frame.copy()


class VariantSet:
    """Mixin for frozen dataclasses whose fields are one :class:`MetricResult` each."""

    @property
    def variants(self) -> dict[str, MetricResult]:
        """Variant name -> result, in field order (the paper's variant first)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_frame(self) -> pd.DataFrame:
        """All variants' rows (see :meth:`MetricResult.to_frame`), concatenated."""
        return pd.concat([r.to_frame() for r in self.variants.values()], ignore_index=True)
