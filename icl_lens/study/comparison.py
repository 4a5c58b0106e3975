"""The result of :func:`icl_lens.study.compare`: accuracies, predictions, metrics, JSON.

``Comparison.metrics()`` is the tidy frame of :mod:`icl_lens.analyses` (one row per
metric, variant, baseline, layer, head) with rows computed elsewhere under their own
``baseline`` (the test-retest ceilings ``icl_retest`` / ``ft_retest``, the
untrained-weights control ``untrained_weights``), and two more columns: ``ft_mode``
(the FT variant the row's FT side comes from) and ``flag`` (why a value cannot speak:
Rec2FTP fixed by the accuracies, an interval that overlaps a shuffled pairing's; None
otherwise). ``summary()`` is the compact view written to ``results.json`` under
``"metrics"``: per metric its value (the paper's variant), CI, baselines, flag, and
every variant.

>>> import pandas as pd
>>> from icl_lens import analyses
>>> frame = analyses.rec2ftp(zsl=[0, 0, 1], icl=[1, 0, 1], ft=[1, 1, 1]).to_frame()
>>> c = Comparison(accuracy={"zsl": 1 / 3, "icl": 2 / 3, "ft": 1.0}, frame=frame)
>>> c.summary()["rec2ftp"]["value"], c.summary()["rec2ftp"]["baselines"]
(0.5, {'independent': 0.5})
>>> Comparison.from_dict(c.to_dict()).metrics().equals(c.metrics())
True
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icl_lens.analyses import ALL, FRAME_COLUMNS, OBSERVED, with_head_labels
from icl_lens.study.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["ACCURACY", "PAPER_VARIANT", "Comparison"]

ACCURACY = "accuracy"
"""``metric`` of the accuracy rows of :meth:`Comparison.accuracy_frame`."""
PAPER_VARIANT = {
    "rec2ftp": "paper",
    "simaou": "normalised",
    "simam": "after",
    "kendall": "tau_b",
    "topk_recall": "token",
}
"""The variant each metric reports as its ``value`` (the paper's / authors' definition)."""

EXTRA_COLUMNS = ("ft_mode", "flag")
"""Columns of a comparison's frame beyond the analyses' tidy ``FRAME_COLUMNS``."""

_INT_COLUMNS = ("layer", "head", "n_queries", "n_skipped")
_FLOAT_COLUMNS = ("value", "ci_low", "ci_high")


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _per_layer(x: np.ndarray) -> np.ndarray:
    """``(n, layer, head)`` values as their mean over the defined heads (NaN where none
    is), float32; other shapes as they are."""
    if x.ndim == 3:
        ok = ~np.isnan(x)
        count = ok.sum(axis=2)
        total = np.where(ok, x, 0.0).sum(axis=2)
        x = np.full(count.shape, np.nan)
        np.divide(total, count, out=x, where=count > 0)
    return x.astype(np.float32)


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass
class Comparison:
    """ICL vs finetuning on one model, task and demonstration set.

    - ``accuracy``: ``{"zsl", "icl", "ft"}`` validation accuracy.
    - ``predictions``: ``{"gold", "zsl", "icl", "ft"}`` per-query class indices.
    - ``frame``: the tidy metric frame (see :meth:`metrics`).
    - ``lr``: the selected FT learning rate; ``lr_search``: every trial (lr, accuracy,
      gold_log_prob, diverged, losses), both of the first FT mode.
    - ``ft_modes``: per FT mode its accuracy, lr, lr search, lr flag and Rec2FTP counts.
    - ``flags``: what the run cannot say (an lr at the edge of its grid, a missing ceiling).
    - ``control``: the untrained-weights control: draws, their accuracies, and per FT
      mode the spread of each metric over the draws (None if not run).
    - ``config`` / ``info``: what was asked for, and what happened (effective k, ...).
    - ``results``: the analyses result objects of the first FT mode (not serialised;
      None after from_json).
    - ``values``: per-query values of every overall row, ``{(metric, variant, baseline,
      ft_mode): {sub_key: values}}`` (``sub_key`` ``()``, or ``(draw,)`` for the control),
      the inputs of a bootstrap over several runs (not serialised).
    - ``stages``: which pipeline stages this call ``loaded`` from checkpoints and which
      it ``computed`` (not serialised).
    """

    accuracy: dict[str, float]
    frame: pd.DataFrame
    predictions: dict[str, list[int]] = field(default_factory=dict)
    lr: float | None = None
    lr_search: list[dict] = field(default_factory=list)
    control: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    ft_modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    values: dict[tuple, dict[tuple, Any]] = field(default_factory=dict, repr=False, compare=False)
    stages: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)
    prompt: Any = field(default=None, repr=False, compare=False)
    """The ICL prompt of the first validation query (not serialised)."""
    spec: Any = field(default=None, repr=False, compare=False)
    """The task's TaskSpec (not serialised)."""

    # ---- views (imported when called: views sit above this layer) ---------------------
    def report(self, path: str | os.PathLike, *, model=None) -> Path:
        """Write one self-contained offline HTML page; with the ``model`` the comparison
        ran on, it includes the circuitsvis panels of the top heads for the first query.

        >>> cmp.report("sst2.html", model=model)   # doctest: +SKIP
        """
        from icl_lens.views.report import write_report
        from icl_lens.views.run_data import collect_views

        views = None
        if model is not None and self.prompt is not None:
            views = collect_views(model, self.prompt, ft_lr=self.lr, spec=self.spec)
        return write_report(self, path, views=views)

    def plot_layers(self, *, only=None, ncols: int | None = None):
        """Each metric per layer with its 95% interval (band) and baselines (dashed), one
        panel per metric and variant: a matplotlib ``Figure`` to save for a paper.
        ``only``: metric names to keep, e.g. ``["simaou", "kendall"]``.

        >>> fig = cmp.plot_layers(only=["simaou"])        # doctest: +SKIP
        >>> fig.savefig("layers.pdf")                     # doctest: +SKIP
        """
        from icl_lens.views.figures import plot_layers

        return plot_layers(self.metrics(), only=only, ncols=ncols)

    def plot_heads(self, *, only=None, ncols: int | None = None):
        """Layer x head heatmaps (a matplotlib ``Figure``) of every metric and variant
        measured per head (SimAM).

        >>> cmp.plot_heads().savefig("heads.pdf")         # doctest: +SKIP
        """
        from icl_lens.views.heatmaps import plot_metric_heads

        return plot_metric_heads(self.metrics(), only=only, ncols=ncols)

    def metrics(self) -> pd.DataFrame:
        """Tidy rows ``metric, variant, baseline, layer, head, head_label, value, ci_low,
        ci_high, n_queries, n_skipped, ft_mode, flag`` (``baseline == "none"``: the metric
        itself; ``-1`` in layer/head: all layers/heads or no such axis; ``head_label``:
        ``L{layer}H{head}``, ``L{layer}`` or ``all``; ``flag``: why a value cannot speak,
        or None)."""
        return with_head_labels(self.frame)

    @property
    def primary_mode(self) -> str | None:
        """The FT mode whose numbers ``accuracy["ft"]``, ``lr`` and ``summary()`` show."""
        if "ft_mode" not in self.frame or self.frame.empty:
            return None
        return str(self.frame["ft_mode"].iloc[0])

    def _overall(self, ft_mode: str | None) -> pd.DataFrame:
        f = self.frame[(self.frame["layer"] == ALL) & (self.frame["head"] == ALL)]
        if "ft_mode" in f:
            f = f[f["ft_mode"] == (ft_mode or self.primary_mode)]
        return f

    def table(self, ft_mode: str | None = None) -> pd.DataFrame:
        """One row per (metric, variant) of one FT mode (default: the first), in the
        frame's order: value, CI, one column per baseline (NaN where a baseline does not
        apply or the value is undefined), and ``flag``."""
        f = self._overall(ft_mode)
        key = ["metric", "variant"]
        cols = ["value", "ci_low", "ci_high"] + (["flag"] if "flag" in f else [])
        obs = f[f["baseline"] == OBSERVED].set_index(key)[cols]
        flag = obs.pop("flag") if "flag" in obs else None
        others = f[f["baseline"] != OBSERVED]
        for name in others["baseline"].drop_duplicates():
            obs[name] = others[others["baseline"] == name].set_index(key)["value"]
        if flag is not None:
            obs["flag"] = flag
        return obs

    def summary(self, ft_mode: str | None = None) -> dict[str, dict[str, Any]]:
        """Per metric: ``value`` (paper variant), ``ci``, ``baselines``, ``flag`` and
        ``variants``, for one FT mode (default: the first)."""
        f = self._overall(ft_mode)
        out: dict[str, dict[str, Any]] = {}
        for metric, rows in f.groupby("metric", sort=False):
            variants = {}
            for variant, vrows in rows.groupby("variant", sort=False):
                by = vrows.set_index("baseline")
                obs = by.loc[OBSERVED]
                flag = obs.get("flag") if "flag" in by else None
                variants[variant] = {
                    "value": float(obs["value"]),
                    "ci": [float(obs["ci_low"]), float(obs["ci_high"])],
                    "n_queries": int(obs["n_queries"]),
                    "n_skipped": int(obs["n_skipped"]),
                    "baselines": {b: float(r["value"]) for b, r in by.iterrows() if b != OBSERVED},
                    "baseline_cis": {
                        b: [float(r["ci_low"]), float(r["ci_high"])]
                        for b, r in by.iterrows()
                        if b != OBSERVED
                    },
                    "flag": flag if isinstance(flag, str) else None,
                }
            main = variants.get(PAPER_VARIANT.get(metric, ""), next(iter(variants.values())))
            out[metric] = {
                "value": main["value"],
                "ci": main["ci"],
                "variant": PAPER_VARIANT.get(metric),
                "baselines": main["baselines"],
                "flag": main["flag"],
                "variants": variants,
            }
        mode = ft_mode or self.primary_mode
        extra = (self.ft_modes.get(mode) or {}).get("rec2ftp_counts") or self.info.get(
            "rec2ftp_counts"
        )
        if extra and "rec2ftp" in out:
            out["rec2ftp"]["counts"] = extra
        return out

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``accuracy``, ``metrics`` (the summary), ``table`` (all frame rows),
        predictions, lr search, control, config, info. NaN is written as null."""
        columns = [*FRAME_COLUMNS, *(c for c in EXTRA_COLUMNS if c in self.frame)]
        rows = self.frame[columns].to_dict(orient="records")
        modes = {
            mode: {**entry, "metrics": self.summary(mode)} for mode, entry in self.ft_modes.items()
        }
        return _clean(
            {
                "accuracy": self.accuracy,
                "metrics": self.summary(),
                "flags": self.flags,
                "lr": {"selected": self.lr, "grid": self.lr_search},
                "ft_modes": modes,
                "control": self.control,
                "predictions": self.predictions,
                "config": self.config,
                "info": self.info,
                "table": rows,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        rows = data.get("table", [])
        extra = [c for c in EXTRA_COLUMNS if rows and c in rows[0]]
        frame = pd.DataFrame(rows, columns=[*FRAME_COLUMNS, *extra])
        if "flag" in frame:
            flags = [x if isinstance(x, str) else None for x in frame["flag"]]
            frame["flag"] = pd.Series(flags, index=frame.index, dtype=object)
        for col in _FLOAT_COLUMNS:
            frame[col] = frame[col].map(_num).astype(np.float64)
        for col in _INT_COLUMNS:
            frame[col] = frame[col].astype(np.int64)
        lr = data.get("lr") or {}
        return cls(
            accuracy={k: _num(v) for k, v in data["accuracy"].items()},
            frame=frame,
            predictions=data.get("predictions", {}),
            lr=lr.get("selected"),
            lr_search=lr.get("grid", []),
            control=data.get("control"),
            config=data.get("config", {}),
            info=data.get("info", {}),
            ft_modes={
                mode: {k: v for k, v in entry.items() if k != "metrics"}
                for mode, entry in (data.get("ft_modes") or {}).items()
            },
            flags=list(data.get("flags") or []),
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (temporary file + rename)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        return atomic_write_text(path, text + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Comparison:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """The tidy metric frame as CSV (the analyses columns, then ``ft_mode`` and
        ``flag``; :meth:`metrics` and the report add ``head_label``), written atomically."""
        return atomic_write_text(path, self.frame.to_csv(index=False))

    def save_values(self, path: str | os.PathLike) -> Path:
        """The per-query values of every overall row (:attr:`values`) as a compressed
        ``.npz`` (no pickle), written atomically: what a bootstrap over several runs needs
        (``icl-lens run`` writes ``values.npz``; a sweep's aggregate interval reads it).
        Values with a head axis are stored as their mean over heads per query and layer,
        in float32: the overall and per-layer statistics are unchanged where every head's
        value is defined.

        >>> cmp.save_values("runs/gpt2-sst2/values.npz")              # doctest: +SKIP
        >>> Comparison.load_values("runs/gpt2-sst2/values.npz")        # doctest: +SKIP
        """
        keys, arrays = [], {}
        for (metric, variant, baseline, mode), runs in self.values.items():
            for sub, x in runs.items():
                arrays[f"v{len(keys)}"] = _per_layer(np.asarray(x, dtype=np.float64))
                keys.append([metric, variant, baseline, mode, list(sub)])
        buffer = io.BytesIO()
        np.savez_compressed(buffer, keys=np.array(json.dumps(keys)), **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @staticmethod
    def load_values(path: str | os.PathLike) -> dict[tuple, dict[tuple, np.ndarray]]:
        """What :meth:`save_values` wrote, in the shape of :attr:`values`."""
        out: dict[tuple, dict[tuple, np.ndarray]] = {}
        with np.load(path, allow_pickle=False) as data:
            for i, (metric, variant, baseline, mode, sub) in enumerate(
                json.loads(str(data["keys"]))
            ):
                runs = out.setdefault((metric, variant, baseline, mode), {})
                runs[tuple(sub)] = data[f"v{i}"].astype(np.float64)
        return out

    def accuracy_frame(self) -> pd.DataFrame:
        """ZSL / ICL / FT accuracy as rows of the metric frame: ``metric == "accuracy"``,
        ``variant`` the setting, ``baseline`` none (or untrained_weights: the control)."""
        from icl_lens.study.measure import CONTROL

        n = int(self.info.get("n_queries", 0))
        rows = [(s, OBSERVED, v) for s, v in self.accuracy.items()]
        rows += [(s, CONTROL, v) for s, v in ((self.control or {}).get("accuracy") or {}).items()]
        return pd.DataFrame(
            [(ACCURACY, s, b, ALL, ALL, _num(v), np.nan, np.nan, n, 0) for s, b, v in rows],
            columns=list(FRAME_COLUMNS),
        )

    def labelled_frame(self, labels: dict[str, Any] | None = None) -> pd.DataFrame:
        """Accuracy rows, then the metric frame, with a constant column per label
        (``{"model": "gpt2", "seed": 1}``) in front: a sweep stacks its cells so."""
        labels = labels or {}
        clash = sorted(set(labels) & set(FRAME_COLUMNS))
        if clash:
            raise ValueError(f"labels {clash} are columns of the metric frame already")
        extra = [c for c in EXTRA_COLUMNS if c in self.frame]  # ft_mode tells rows apart
        frame = pd.concat(
            [self.accuracy_frame(), self.frame[[*FRAME_COLUMNS, *extra]]], ignore_index=True
        )
        if "flag" in frame:  # missing as in a table file (Parquet, CSV): NaN
            frame["flag"] = frame["flag"].astype("str").where(frame["flag"].notna())
        for i, (name, value) in enumerate(labels.items()):
            frame.insert(i, name, [value] * len(frame))
        return frame

    def to_parquet(self, path: str | os.PathLike, *, labels: dict[str, Any] | None = None) -> Path:
        """:meth:`labelled_frame` as Parquet, written atomically.

        >>> c.to_parquet(tmp / "sst2.parquet", labels={"model": "gpt2"})  # doctest: +SKIP
        """
        buffer = io.BytesIO()
        self.labelled_frame(labels).to_parquet(buffer, index=False)
        return atomic_write_bytes(path, buffer.getvalue())

    def to_dataset(self, *, labels: dict[str, Any] | None = None):
        """:meth:`labelled_frame` as a ``datasets.Dataset``.

        >>> c.to_dataset().column_names[:3]                 # doctest: +SKIP
        ['metric', 'variant', 'baseline']
        """
        from datasets import Dataset

        return Dataset.from_pandas(self.labelled_frame(labels), preserve_index=False)

    def __repr__(self) -> str:
        acc = ", ".join(f"{k}={v:.3f}" for k, v in self.accuracy.items())
        values = ", ".join(f"{m}={s['value']:.3f}" for m, s in self.summary().items())
        return f"Comparison({acc}; {values})"
