"""The tidy frame of the interventions study: one row per (condition, metric, quantity).

A *condition* is one column of the label logits a study keeps: ICL, Blind, ZSL, FT, the
task vector, or an intervention (``knockout``, ``restore``, ``transplant``) on a scope of
heads, possibly under a control; draws of a random control (``draw``) are averaged per
query. :func:`intervention_frame` turns the label logits of one or several demonstration
sets into the frame :class:`~icl_lens.study.intervention_result.Interventions` exposes
(columns :data:`FRAME_COLUMNS`, docs/interventions.md):

- ``quantity == "value"``: the mean of the metric (``margin``, ``accuracy``) under the
  condition, with a paired percentile bootstrap over queries (one set) or the
  hierarchical interval over sets (several);
- ``recovered`` (Restore, Transplant: against ICL and Blind; FT and the task vector:
  against ICL and ZSL) and ``removed`` (Knockout: against ICL and Blind), the ratios of
  :mod:`icl_lens.analyses.recovery`, NaN and flagged where ICL does not move the metric.
  The controls are normalised by the real prompt's ICL and Blind.

>>> import numpy as np, pandas as pd
>>> conditions = pd.DataFrame([condition("icl"), condition("blind"),
...                            condition("restore", scope="layer", layer=0)])
>>> logits = np.array([[[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]] * 4)
>>> f = intervention_frame([(logits, np.zeros(4, int))], conditions, n_resamples=50)
>>> f.query("intervention == 'restore' and metric == 'margin'")[["quantity", "value"]]
    quantity  value
4      value    1.0
5  recovered    0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from icl_lens.analyses import interval_flags, join_flags, with_head_labels
from icl_lens.analyses.recovery import (
    effect_interval,
    label_margins,
    query_means,
    set_interval,
    share,
)

__all__ = [
    "CONDITION_COLUMNS",
    "CONTROLS",
    "FORMS",
    "FRAME_COLUMNS",
    "INTERVENTIONS",
    "KEY_COLUMNS",
    "METRICS",
    "SCOPES",
    "condition",
    "intervention_frame",
    "quantity_of",
]

INTERVENTIONS = (
    "icl",
    "blind",
    "zsl",
    "zsl_same_positions",
    "ft",
    "knockout",
    "restore",
    "transplant",
    "task_vector",
)
FORMS = ("", "linear", "fitted", "softmax")
SCOPES = ("model", "layer", "head", "top_k", "random_k")
CONTROLS = ("none", "permuted_labels", "other_task", "random_update", "random_heads")
METRICS = ("margin", "accuracy")
KEY_COLUMNS = ("intervention", "form", "scope", "layer", "head", "k", "control")
"""What a frame row is about (the draws of a random control are averaged)."""
CONDITION_COLUMNS = (*KEY_COLUMNS, "draw")
"""One column of the label logits."""
FRAME_COLUMNS = (
    *KEY_COLUMNS,
    "metric",
    "quantity",
    "value",
    "ci_low",
    "ci_high",
    "n_queries",
    "flag",
    "head_label",
)


def condition(
    intervention: str,
    form: str = "",
    *,
    scope: str = "model",
    layer: int = -1,
    head: int = -1,
    k: int = -1,
    control: str = "none",
    draw: int = -1,
) -> dict:
    """One condition's key (a row of a conditions frame), checked.

    >>> condition("transplant", "fitted", scope="head", layer=2, head=1)["head"]
    1
    """
    for name, value, known in (
        ("intervention", intervention, INTERVENTIONS),
        ("form", form, FORMS),
        ("scope", scope, SCOPES),
        ("control", control, CONTROLS),
    ):
        if value not in known:
            raise ValueError(f"{name} must be one of {known}, got {value!r}")
    return {
        "intervention": intervention,
        "form": form,
        "scope": scope,
        "layer": int(layer),
        "head": int(head),
        "k": int(k),
        "control": control,
        "draw": int(draw),
    }


def quantity_of(intervention: str) -> tuple[str, str] | None:
    """The share an intervention reports and its baseline: ``(kind, baseline)``, or
    None for the reference conditions.

    >>> quantity_of("knockout"), quantity_of("ft"), quantity_of("icl")
    (('removed', 'blind'), ('recovered', 'zsl'), None)
    """
    if intervention == "knockout":
        return "removed", "blind"
    if intervention in ("restore", "transplant"):
        return "recovered", "blind"
    if intervention in ("ft", "task_vector"):
        return "recovered", "zsl"
    return None


def _reference(keys: list[tuple], name: str) -> int | None:
    want = (name, "", "model", -1, -1, -1, "none")
    return keys.index(want) if want in keys else None


def _undefined_note(metric: str, baseline: str, effect: dict) -> str:
    return (
        f"undefined: ICL does not move the {metric} beyond its interval (ICL - "
        f"{baseline.upper() if baseline == 'zsl' else baseline.capitalize()}: "
        f"{effect['value']:.3g} [{effect['low']:.3g}, {effect['high']:.3g}])"
    )


def intervention_frame(
    sets: Sequence[tuple[np.ndarray, np.ndarray]],
    conditions: pd.DataFrame,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_sets: bool = False,
) -> pd.DataFrame:
    """The frame of :data:`FRAME_COLUMNS` from ``sets``: per demonstration set its label
    logits ``(query, condition, class)`` and gold classes ``(query,)``, the same
    queries and ``conditions`` (:data:`CONDITION_COLUMNS`, one row per logits column) in
    every set. ``n_sets``: add a column of the sets each value is defined in (a table
    over sets; an interval from one set is then flagged)."""
    conditions = conditions.reset_index(drop=True)
    keys = list(dict.fromkeys(map(tuple, conditions[list(KEY_COLUMNS)].itertuples(index=False))))
    where = {key: i for i, key in enumerate(keys)}
    column_key = [where[tuple(r)] for r in conditions[list(KEY_COLUMNS)].itertuples(index=False)]
    groups = np.zeros((len(conditions), len(keys)))  # a key's mean over its draws
    groups[np.arange(len(conditions)), column_key] = 1.0
    groups /= groups.sum(axis=0, keepdims=True)
    per_metric = {m: [] for m in METRICS}
    for logits, gold in sets:
        if np.shape(logits)[1] != len(conditions):
            raise ValueError(
                f"label logits have {np.shape(logits)[1]} conditions, the table {len(conditions)}"
            )
        margin, correct = label_margins(logits, gold)
        per_metric["margin"].append(margin @ groups)
        per_metric["accuracy"].append(correct @ groups)
    icl, refs = _reference(keys, "icl"), {b: _reference(keys, b) for b in ("blind", "zsl")}
    rows: dict[tuple[int, str, str], dict] = {}
    for metric, values in per_metric.items():
        means = query_means(values, n_resamples=n_resamples, seed=seed)
        n = means.n_queries
        value, low, high, outer = set_interval(means.point, means.reps, n, confidence=confidence)
        for i in range(len(keys)):
            rows[i, metric, "value"] = _row(value[i], low[i], high[i], n, outer[i], None)
        for baseline, base in refs.items():
            which = [
                i for i, key in enumerate(keys) if (quantity_of(key[0]) or ("", ""))[1] == baseline
            ]
            if not which:
                continue
            if icl is None or base is None:
                raise ValueError(f"a share against {baseline} needs the icl and {baseline} rows")
            effect = effect_interval(means, target=icl, baseline=base, confidence=confidence)
            for kind in ("recovered", "removed"):
                chosen = np.array([i for i in which if quantity_of(keys[i][0])[0] == kind])
                if not len(chosen):
                    continue
                point, reps = share(means, chosen, target=icl, baseline=base, kind=kind)
                point[~effect["per_set_defined"]] = np.nan
                reps[:, ~effect["per_set_defined"]] = np.nan
                if effect["defined"]:
                    stats = set_interval(point, reps, n, confidence=confidence)
                    note = None
                else:
                    nan = np.full(len(chosen), np.nan)
                    stats = (nan, nan, nan, np.zeros(len(chosen), int))
                    note = _undefined_note(metric, baseline, effect)
                for j, i in enumerate(chosen):
                    rows[i, metric, kind] = _row(*(s[j] for s in stats[:3]), n, stats[3][j], note)
    order = sorted(rows, key=lambda r: (r[0], METRICS.index(r[1]), r[2] != "value"))
    records = [
        dict(zip(KEY_COLUMNS, keys[i], strict=True)) | {"metric": m, "quantity": q} | rows[i, m, q]
        for i, m, q in order
    ]
    frame = pd.DataFrame(records)
    frame = _flagged(frame, n_sets)
    frame = with_head_labels(frame)
    columns = [*FRAME_COLUMNS, *(["n_sets"] if n_sets else [])]
    return frame[columns]


def _row(value, low, high, n_queries, n_outer, note) -> dict:
    return {
        "value": float(value),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_queries": int(n_queries),
        "n_sets": int(n_outer),
        "flag": note,
    }


def _flagged(frame: pd.DataFrame, n_sets: bool) -> pd.DataFrame:
    """Undefined shares keep their note; an interval from too few queries (or, over
    sets, from one set) is flagged as the comparison's are."""
    probe = frame.assign(baseline="none")
    if not n_sets:
        probe = probe.drop(columns="n_sets")
    own = pd.Series(list(frame["flag"]), index=frame.index, dtype=object)
    frame = frame.copy()
    frame["flag"] = join_flags(own, interval_flags(probe))
    if not n_sets:
        frame = frame.drop(columns="n_sets")
    return frame
