"""Does ICL behave like finetuning on this model and task? (user story 2)

:func:`compare` runs the paper's pipeline (method.md sections 1 and 3) on the same
validation queries:

1. demonstrations: the train split shuffled with ``seed``, the first ``shots`` (or a
   class-balanced draw), optionally re-ordered with ``order_seed``; those that do not
   fit the context are dropped (``info["k_effective"]``);
2. ZSL and ICL: restricted prediction and recordings (:mod:`icl_lens.study.records`);
3. FT: K/V-only SGD on the demonstrations in ICL order, the learning rate chosen by
   validation accuracy over the grid (a diverged rate is recorded, the grid goes on),
   then recordings of the chosen FT model and its training-token query vectors;
4. the four metrics with their baselines and bootstrap CIs (:mod:`icl_lens.study.measure`);
5. the untrained-weights control: steps 2-4 again on a copy of the model with random
   weights (:func:`icl_lens.model.untrained.untrained_copy`), FT at the learning rate chosen
   for the real model (accuracy on a random model says nothing about learning rates),
   reported as ``baseline == "untrained_weights"`` rows.

With ``checkpoint_dir`` every finished stage (a setting's recordings, one learning
rate) is saved atomically and a rerun with the same arguments resumes where it stopped.

>>> import icl_lens as il                                        # doctest: +SKIP
>>> cmp = il.compare(model, "sst2", shots=32, seed=1)            # doctest: +SKIP
>>> cmp.accuracy                                                 # doctest: +SKIP
{'zsl': 0.70, 'icl': 0.92, 'ft': 0.74}
>>> cmp.metrics()                                                # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from icl_lens.analyses import aggregate_runs
from icl_lens.data.demonstrations import (
    demonstration_token_counter,
    fit_to_context,
    query_token_budget,
    sample_demonstrations,
)
from icl_lens.data.prompts import encode, task_prompt
from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Task
from icl_lens.hooks.logits import logit_hook
from icl_lens.model.adapter import adapt
from icl_lens.model.untrained import untrained_copy
from icl_lens.study.checkpoint import Checkpoints
from icl_lens.study.comparison import Comparison
from icl_lens.study.finetune import finetune
from icl_lens.study.lr_search import BestTrial, LrTrial, run_trial, select_lr
from icl_lens.study.lr_search import lr_grid as resolve_lr_grid
from icl_lens.study.measure import control_rows, measure
from icl_lens.study.predict import label_tokens, predict_queries
from icl_lens.study.records import PROTOCOLS, Records, record

__all__ = ["ComparisonSet", "compare", "compare_runs"]


def _fingerprint_model(model) -> str:
    """Cheap identity of the weights (shapes and float64 sums), for checkpoint checks."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            h.update(
                f"{name}{tuple(p.shape)}{x.sum().item():.10e}{x.abs().sum().item():.10e}".encode()
            )
    return h.hexdigest()[:16]


def _fingerprint_task(task: Task) -> str:
    h = hashlib.sha256(repr(task.spec).encode())
    for split in (task.train, task.validation):
        for ex in split:
            h.update(repr((sorted(ex.fields.items()), ex.label)).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def _check_finite_logits(adapter, prompt) -> None:
    """One zero-shot and one in-context forward of the first query, before any work:
    a model whose logits are NaN or infinite is broken, and would otherwise surface only
    as "every learning rate of the grid diverged"."""
    zero_shot = torch.cat([prompt.tokens[:1], prompt.query_tokens])
    with adapter.inference():
        for setting, tokens in (("zero-shot", zero_shot), ("in-context", prompt.tokens)):
            last = adapter.forward(
                tokens[None].to(adapter.device), fwd_hooks=[logit_hook(None, last=True)]
            )[0, -1]
            if not torch.isfinite(last).all():
                bad = "NaN" if torch.isnan(last).any() else "infinite"
                raise ValueError(
                    f"the model itself is broken: its {setting} logits for the first query "
                    f"are {bad} before any finetuning; check its weights (and the dtype: "
                    "float16 overflows in some models)"
                )


def _load(store: Checkpoints | None, stage: str, compute: Callable[[], Any]) -> Any:
    if store is not None:
        found = store.get(stage)
        if found is not None:
            return found
    value = compute()
    return store.put(stage, value) if store is not None else value


def _records(store, stage, compute) -> Records:
    return Records.from_dict(_load(store, stage, lambda: compute().to_dict()))


def compare(
    model,
    task: Task | str | os.PathLike,
    *,
    shots: int = 32,
    seed: int = 1,
    order_seed: int | None = None,
    balanced: bool = False,
    lr_grid: str | Sequence[float] = "paper",
    max_queries: int | None = None,
    protocol: str = "prediction",
    kendall_queries: int | None = 100,
    control: bool = True,
    control_seed: int = 0,
    batch_size: int = 8,
    n_resamples: int = 1000,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Comparison:
    """ZSL vs ICL vs FT on ``task`` with ``shots`` demonstrations drawn with ``seed``.

    ``task``: a :class:`~icl_lens.data.tasks.Task`, a paper task name or a local file
    (:func:`~icl_lens.data.task_sources.load_task`). ``max_queries`` caps the validation
    queries (after the task's own cap). ``lr_grid``: ``"paper"`` (36 values),
    ``"short"`` (4) or learning rates. ``protocol``: ``"prediction"`` (record at the
    prediction position) or ``"dai2023"`` (at an appended first-candidate label token,
    as the authors' code). ``kendall_queries``: Kendall uses the first that many
    queries (100 as the authors). ``control``: also run the untrained-weights control.
    ``checkpoint_dir``: save finished stages there and resume from them.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise ValueError(
            f"shots must be >= 1, got {shots!r}: ICL and the finetuning baseline both learn "
            "from the demonstrations"
        )
    grid = resolve_lr_grid(lr_grid)
    adapter = adapt(model)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with icl_lens.load_model")
    if not isinstance(task, Task):
        task = load_task(task)
    spec = task.spec
    validation = task.validation[:max_queries] if max_queries is not None else task.validation
    if not validation:
        raise ValueError(f"task {spec.name!r} has no validation examples to compare on")
    labels = label_tokens(tok, spec, context=spec.format_query(validation[0]))

    demos = sample_demonstrations(task, shots, seed=seed, balanced=balanced)
    if order_seed is not None:
        demos = [demos[i] for i in np.random.default_rng(order_seed).permutation(len(demos))]
    budget = query_token_budget(spec, validation, tok, include_label=True)
    fit = fit_to_context(demos, adapter.n_ctx, demonstration_token_counter(spec, tok), budget)
    if fit.k_effective == 0:  # every drawn demonstration is too long even alone
        longest = max(n for _, n in fit.skipped)
        raise ValueError(
            f"none of the {len(demos)} demonstrations fits the model's context of "
            f"{adapter.n_ctx} tokens next to the longest query ({budget} tokens): each "
            f"has more than {adapter.n_ctx - budget} tokens (up to {longest}); use shorter "
            "texts or a model with a longer context"
        )
    if fit.n_dropped:
        warnings.warn(
            f"{fit.n_dropped} of {shots} demonstrations do not fit the context of "
            f"{adapter.n_ctx} tokens; using k={fit.k_effective}",
            stacklevel=2,
        )
    prompt = task_prompt(tok, spec, fit.demonstrations, validation[0], n_ctx=adapter.n_ctx)
    _check_finite_logits(adapter, prompt)
    prefix, bos = prompt.prefix, prompt.prefix[:1]
    queries = [
        torch.tensor(encode(tok, spec.format_query(ex)), dtype=torch.long) for ex in validation
    ]
    gold = [ex.label for ex in validation]

    config = {
        "model": _fingerprint_model(model),
        "task": _fingerprint_task(task),
        "task_name": spec.name,
        "shots": shots,
        "seed": seed,
        "order_seed": order_seed,
        "balanced": balanced,
        "lr_grid": list(grid),
        "n_queries": len(validation),
        "protocol": protocol,
        "kendall_queries": kendall_queries,
        "control": control,
        "control_seed": control_seed,
        "n_resamples": n_resamples,
    }
    store = Checkpoints(checkpoint_dir, config) if checkpoint_dir is not None else None
    rec_opts = {
        "gold": gold,
        "protocol": protocol,
        "keep_queries": kendall_queries,
        "batch_size": batch_size,
        "progress": progress,
    }
    n_stages = 3 + len(grid) + (3 if control else 0)
    bar = tqdm(total=n_stages, desc=f"compare {spec.name}", disable=not progress)

    def stage(name: str, compute: Callable[[], Any], *, records: bool = False) -> Any:
        bar.set_postfix_str(name)
        out = _records(store, name, compute) if records else _load(store, name, compute)
        bar.update(1)
        return out

    def settings(get_model: Callable[[], Any], prefix_tag: str, lr: float, reuse=lambda: None):
        """ZSL, ICL and FT (at ``lr``) stages; ``get_model`` is called only if one of
        them has to be computed; ``reuse()`` may return the finetuned copy already."""
        zsl = stage(
            f"{prefix_tag}zsl",
            lambda: record(get_model(), bos, queries, labels, desc="zsl", **rec_opts),
            records=True,
        )
        icl = stage(
            f"{prefix_tag}icl",
            lambda: record(get_model(), prefix, queries, labels, desc="icl", **rec_opts),
            records=True,
        )

        def run_ft():
            ft = reuse() or finetune(
                get_model(), prompt, lr=lr, record_queries=True, progress=progress
            )
            if ft.diverged:
                return {"diverged": True, "losses": ft.losses.tolist()}
            rec = record(ft.model, bos, queries, labels, desc="ft", **rec_opts)
            return {
                "diverged": False,
                "losses": ft.losses.tolist(),
                "records": rec.to_dict(),
                "train_queries": ft.train_queries,
            }

        ft = stage(f"{prefix_tag}ft", run_ft)
        return zsl, icl, ft

    def evaluate(ft_model):
        return predict_queries(ft_model, bos, queries, labels, gold=gold, batch_size=batch_size)

    trials = []
    kept = BestTrial()  # the chosen lr's finetuned copy is rebuilt, not trained again
    for lr in grid:
        bar.set_postfix_str(f"lr={lr:g}")
        trial = _load(
            store,
            f"lr={lr!r}",
            lambda lr=lr: run_trial(model, prompt, lr, evaluate, keep=kept.offer).to_dict(),
        )
        trials.append(LrTrial(**trial))
        bar.update(1)
    best = select_lr(trials)

    zsl, icl, ft = settings(lambda: model, "", best.lr, reuse=lambda: kept.take(model, best.lr))
    if ft["diverged"]:  # cannot happen for a deterministic rerun of a converged trial
        raise RuntimeError(f"finetuning at the selected lr={best.lr:g} diverged on its rerun")
    ft_rec = Records.from_dict(ft["records"])
    measured = measure(
        zsl,
        icl,
        ft_rec,
        ft["train_queries"],
        seed=seed,
        kendall_queries=kendall_queries,
        n_resamples=n_resamples,
    )
    frame = measured.frame
    control_info = None
    if control:
        untrained = functools.cache(lambda: untrained_copy(model, seed=control_seed))
        c_zsl, c_icl, c_ft = settings(untrained, "control-", best.lr)
        control_info = {"seed": control_seed, "lr": best.lr, "ft_diverged": c_ft["diverged"]}
        control_info["accuracy"] = {"zsl": c_zsl.accuracy, "icl": c_icl.accuracy}
        if not c_ft["diverged"]:
            c_ft_rec = Records.from_dict(c_ft["records"])
            control_info["accuracy"]["ft"] = c_ft_rec.accuracy
            c_measured = measure(
                c_zsl,
                c_icl,
                c_ft_rec,
                c_ft["train_queries"],
                seed=seed,
                kendall_queries=kendall_queries,
                n_resamples=n_resamples,
            )
            frame = pd.concat([frame, control_rows(c_measured)], ignore_index=True)
        del untrained
    bar.close()

    r2 = measured.results["rec2ftp"]
    info = {
        "task": spec.name,
        "task_info": {
            k: v for k, v in task.info.items() if isinstance(v, str | int | float | type(None))
        },
        "n_queries": len(validation),
        "k_requested": shots,
        "k_effective": fit.k_effective,
        "demonstration_tokens": int(len(prefix) - 1),
        "label_tokens": [list(ids) for ids in labels.ids],
        "model_line": adapter.line,
        "rec2ftp_counts": {
            "n_zsl_wrong": r2.n_zsl_wrong,
            "n_ft_recovered": r2.n_ft_recovered,
            "n_icl_recovered": r2.n_icl_recovered,
            "n_both": r2.n_both,
        },
    }
    result = Comparison(
        accuracy={"zsl": zsl.accuracy, "icl": icl.accuracy, "ft": ft_rec.accuracy},
        frame=frame,
        predictions={
            "gold": gold,
            "zsl": zsl.predictions.predicted.tolist(),
            "icl": icl.predictions.predicted.tolist(),
            "ft": ft_rec.predictions.predicted.tolist(),
        },
        lr=best.lr,
        lr_search=[t.to_dict() for t in trials],
        control=control_info,
        config={k: v for k, v in config.items() if k not in ("model", "task")},
        info=info,
        results=measured.results,
        prompt=prompt,
        spec=spec,
    )
    result.stages = {
        "loaded": list(store.loaded) if store else [],
        "computed": list(store.computed) if store else [],
    }
    return result


@dataclass
class ComparisonSet:
    """Several :func:`compare` runs (seeds x demonstration orders) and their spread."""

    runs: dict[tuple[int, int | None], Comparison]

    def metrics(self) -> pd.DataFrame:
        """Every run's tidy frame with ``seed`` and ``order`` columns."""
        parts = [
            c.metrics().assign(seed=s, order=-1 if o is None else o)
            for (s, o), c in self.runs.items()
        ]
        return pd.concat(parts, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Mean, std, min, max and n of every metric row over the runs."""
        return aggregate_runs(self.metrics(), over=["seed", "order"])

    def accuracy(self) -> pd.DataFrame:
        rows = [{"seed": s, "order": o, **c.accuracy} for (s, o), c in self.runs.items()]
        return pd.DataFrame(rows)


def compare_runs(
    model,
    task: Task | str | os.PathLike,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    orders: Sequence[int | None] = (None,),
    checkpoint_dir: str | os.PathLike | None = None,
    **kwargs,
) -> ComparisonSet:
    """:func:`compare` for every seed (demonstration set) and order seed (demonstration
    order of the same set; ``None`` keeps the shuffled order), aggregated.

    >>> runs = compare_runs(model, "sst2", seeds=(1, 2), orders=(None, 0))  # doctest: +SKIP
    >>> runs.summary().query("baseline == 'none' and layer == -1")          # doctest: +SKIP
    """
    if not isinstance(task, Task):
        task = load_task(task)
    runs = {}
    for s in seeds:
        for o in orders:
            sub = None
            if checkpoint_dir is not None:
                sub = (
                    Path(checkpoint_dir)
                    / f"seed-{s}"
                    / ("order-none" if o is None else f"order-{o}")
                )
            runs[s, o] = compare(model, task, seed=s, order_seed=o, checkpoint_dir=sub, **kwargs)
    return ComparisonSet(runs)
