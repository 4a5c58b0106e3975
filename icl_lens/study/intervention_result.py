"""What :func:`~icl_lens.intervene` returns: :class:`Interventions` (one demonstration set)
and :class:`InterventionSet` (several, with intervals over them).

The data are the label-word logits of every measured query under every condition
(``label_logits``, one column per row of ``conditions``) and the gold classes; ``frame``
is computed from them (:func:`~icl_lens.study.intervention_frame.intervention_frame`).
Everything serialises to JSON (``to_json`` / ``from_json``, written atomically), so a
table over sets can be rebuilt from the files of finished runs.

>>> res = il.intervene(model, task, shots=8, max_queries=32)               # doctest: +SKIP
>>> res.frame.query("scope == 'model' and metric == 'margin'")             # doctest: +SKIP
>>> res.plot_curve()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.data.prompts import Prompt
from icl_lens.files import atomic_write_text
from icl_lens.study.comparison import _clean, _num
from icl_lens.study.intervention_frame import (
    CONDITION_COLUMNS,
    FRAME_COLUMNS,
    KEY_COLUMNS,
    intervention_frame,
)

__all__ = ["InterventionSet", "Interventions"]

_INT = ("layer", "head", "k", "n_queries")
_FLOAT = ("value", "ci_low", "ci_high")


@dataclass
class Interventions:
    """The causal tests of the dual form on one demonstration set (docs/interventions.md).

    - ``frame``: one row per (condition, metric, quantity), columns
      :data:`~icl_lens.study.intervention_frame.FRAME_COLUMNS`.
    - ``scales``: the fitted c_h, ``[layer, head]``, fitted on the held-out fit queries.
    - ``ranking``: every head, most necessary first (removed by its knockout on the fit
      queries): the order of the top-k curves.
    - ``task_vector_layer``: the layer the task vector is patched at (chosen on the fit
      queries).
    - ``info``: task, k, queries, fit queries, Blind-vs-ZSL logit difference, the
      run-time identities, path (cache/full), the FT learning rate, ...
    - ``flags``: what the run cannot say (a control left out, ...).
    - ``conditions`` / ``label_logits`` / ``gold``: the data the frame is computed from
      (FT's columns hold its class log-probabilities: the same margins and argmax).
    - ``prompt``, ``queries``, ``label_ids``: the ICL prompt (first measured query), the
      measured queries' tokens and the label words' token ids (for the views).
    """

    frame: pd.DataFrame
    scales: Float[Tensor, "layer head"]
    ranking: list[tuple[int, int]]
    task_vector_layer: int
    info: dict[str, Any]
    conditions: pd.DataFrame
    label_logits: Float[Tensor, "query condition n_class"]
    gold: Int[Tensor, " query"]
    flags: list[str] = field(default_factory=list)
    prompt: Prompt | None = field(default=None, repr=False)
    queries: list[Int[Tensor, " pos"]] = field(default_factory=list, repr=False)
    label_ids: tuple[int, ...] = ()
    stages: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    """Which stages this call ``loaded`` from checkpoints and which it ``computed`` (not
    serialised)."""

    # ---- views (imported when called: views sit above this layer) ---------------------
    def plot_heads(self, **kwargs):
        """Necessity (removed by Knockout) and sufficiency (recovered by Restore and
        Transplant) per head, layer x head heatmaps."""
        from icl_lens.views.interventions import plot_heads

        return plot_heads(self, **kwargs)

    def plot_curve(self, **kwargs):
        """Recovered / removed against the number of top heads k, with random-heads bands."""
        from icl_lens.views.interventions import plot_curve

        return plot_curve(self, **kwargs)

    def view_transplant(self, model, layer: int, head: int, query: int = 0, **kwargs):
        """Per demonstration token, its contribution to head (layer, head)'s transplanted
        update for measured query ``query``, read on the label direction (circuitsvis)."""
        from icl_lens.views.interventions import view_transplant

        return view_transplant(self, model, layer, head, query=query, **kwargs)

    # ---- data -------------------------------------------------------------------------
    def per_query(self, metric: str = "margin") -> pd.DataFrame:
        """Per measured query (rows) and condition key (columns, draws averaged) the
        ``margin`` or ``accuracy`` (0/1, or a fraction over draws)."""
        from icl_lens.analyses.recovery import label_margins

        margin, correct = label_margins(self.label_logits.numpy(), self.gold.numpy())
        values = {"margin": margin, "accuracy": correct}[metric]
        columns = pd.MultiIndex.from_frame(self.conditions[list(KEY_COLUMNS)])
        return (
            pd.DataFrame(values, columns=columns)
            .T.groupby(level=list(KEY_COLUMNS), sort=False)
            .mean()
            .T
        )

    def recompute_frame(self, *, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
        """The frame again from the label logits (other resamples or seed)."""
        return intervention_frame(
            [(self.label_logits.numpy(), self.gold.numpy())],
            self.conditions,
            n_resamples=n_resamples,
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; NaN as null."""
        prompt = None
        if self.prompt is not None:
            p = self.prompt
            prompt = {
                "tokens": p.tokens.tolist(),
                "demo_spans": [list(s) for s in p.demo_spans],
                "query_start": p.query_start,
                "str_tokens": list(p.str_tokens),
                "label": p.label,
                "tokenizer_id": p.tokenizer_id,
                "separator_lengths": None
                if p.separator_lengths is None
                else list(p.separator_lengths),
            }
        return _clean(
            {
                "info": self.info,
                "flags": self.flags,
                "scales": self.scales.tolist(),
                "ranking": [list(h) for h in self.ranking],
                "task_vector_layer": self.task_vector_layer,
                "table": self.frame[list(FRAME_COLUMNS)].to_dict(orient="records"),
                "conditions": self.conditions[list(CONDITION_COLUMNS)].to_dict(orient="records"),
                "label_logits": self.label_logits.tolist(),
                "gold": self.gold.tolist(),
                "label_ids": list(self.label_ids),
                "prompt": prompt,
                "queries": [q.tolist() for q in self.queries],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interventions:
        frame = pd.DataFrame(data["table"], columns=list(FRAME_COLUMNS))
        frame["flag"] = pd.Series(
            [x if isinstance(x, str) else None for x in frame["flag"]], dtype=object
        )
        for col in _FLOAT:
            frame[col] = frame[col].map(_num).astype(np.float64)
        for col in _INT:
            frame[col] = frame[col].astype(np.int64)
        p = data.get("prompt")
        prompt = None
        if p is not None:
            prompt = Prompt(
                tokens=torch.tensor(p["tokens"], dtype=torch.long),
                demo_spans=tuple(tuple(s) for s in p["demo_spans"]),
                query_start=p["query_start"],
                str_tokens=tuple(p["str_tokens"]),
                label=p["label"],
                tokenizer_id=p["tokenizer_id"],
                separator_lengths=None
                if p["separator_lengths"] is None
                else tuple(p["separator_lengths"]),
            )
        return cls(
            frame=frame,
            scales=torch.tensor(data["scales"], dtype=torch.float32),
            ranking=[tuple(h) for h in data["ranking"]],
            task_vector_layer=int(data["task_vector_layer"]),
            info=data.get("info", {}),
            conditions=pd.DataFrame(data["conditions"], columns=list(CONDITION_COLUMNS)),
            label_logits=torch.tensor(data["label_logits"], dtype=torch.float32),
            gold=torch.tensor(data["gold"], dtype=torch.long),
            flags=list(data.get("flags") or []),
            prompt=prompt,
            queries=[torch.tensor(q, dtype=torch.long) for q in data.get("queries", [])],
            label_ids=tuple(data.get("label_ids", ())),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), allow_nan=False) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Interventions:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """The frame as CSV, written atomically."""
        return atomic_write_text(path, self.frame.to_csv(index=False))

    def __repr__(self) -> str:
        f = self.frame
        rows = f[(f["scope"] == "model") & (f["metric"] == "margin") & (f["control"] == "none")]
        shown = []
        for _, r in rows[rows["quantity"] != "value"].iterrows():
            name = r["intervention"] + (f"({r['form']})" if r["form"] else "")
            shown.append(f"{name}: {r['quantity']} {r['value']:.2f}")
        k = self.info.get("k_effective")
        return f"Interventions({self.info.get('task')}, k={k}; " + ", ".join(shown) + ")"


@dataclass
class InterventionSet:
    """:class:`Interventions` on several demonstration sets (``runs``, by seed)."""

    runs: dict[int, Interventions]

    def table(
        self, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> pd.DataFrame:
        """The frame's rows over all sets: each value the mean over sets, its interval
        over sets and the shared queries (the comparison's hierarchical interval; a share
        is averaged over the sets where ICL moves the metric), with ``n_sets``, the sets
        a value is defined in; an interval from one set is flagged."""
        runs = list(self.runs.values())
        first = runs[0]
        for r in runs[1:]:
            if not r.conditions[list(CONDITION_COLUMNS)].equals(
                first.conditions[list(CONDITION_COLUMNS)]
            ):
                raise ValueError("the runs measured different conditions: run them alike")
            if not torch.equal(r.gold, first.gold):
                raise ValueError("the runs measured different queries: run them alike")
        return intervention_frame(
            [(r.label_logits.numpy(), r.gold.numpy()) for r in runs],
            first.conditions,
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
            n_sets=True,
        )

    def __repr__(self) -> str:
        return f"InterventionSet(seeds={list(self.runs)})"
