"""Causal tests of the dual form (issue 21; docs/interventions.md): knock out, restore and
transplant each head's meta-gradients, on the comparison's model, task, demonstrations
and measured queries.

:func:`intervene` plans the study as :func:`~icl_lens.compare` does
(:func:`~icl_lens.study.plan.plan_study`), then runs its stages, each checkpointed next
to the comparison's (``checkpoint_dir``: the same directory resumes both, and FT is the
comparison's own stages, trained once):

1. ``fit``: on held-out training examples (``fit_queries``; never the measured queries)
   the fitted scale c_h of every head, the heads' ranking by necessity and the task
   vector's layer (:mod:`icl_lens.study.intervention_fit`);
2. ``base``: ICL, Blind, ZSL (and at the ICL positions where the model takes position
   ids), Transplant(all heads, linear | fitted | softmax), the task vector; the
   run-time identities Restore(all) == ICL, Knockout(all) == Blind and
   Transplant(all, softmax) == ICL, checked to 1e-4 relative (an error otherwise: the
   hooks did not act);
3. ``layer-L``: Knockout, Restore, Transplant(linear, fitted) of every head of layer L
   and of the whole layer;
4. ``curves``: the same four on the top-k heads by necessity and on k random heads
   (3 seeded draws), k = 1, 2, 4, ..., all;
5. the controls: dW_ICL from the demonstrations with permuted labels and from another
   task's, and a random update of dW_ICL's norm per head;
6. FT at the learning rate the comparison selects.

>>> import icl_lens as il                                              # doctest: +SKIP
>>> res = il.intervene(il.toy_model(), toy_task(5), shots=8, lr_grid="short")  # doctest: +SKIP
>>> res.frame.query("scope == 'model' and quantity != 'value'")       # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Task
from icl_lens.model.adapter import adapt
from icl_lens.study.checkpoint import Checkpoints, Stages
from icl_lens.study.intervention_frame import condition, intervention_frame
from icl_lens.study.intervention_result import Interventions, InterventionSet
from icl_lens.study.intervention_stages import N_RANDOM_DRAWS, InterventionStages
from icl_lens.study.pipeline import StudyRun, chosen_ft
from icl_lens.study.plan import plan_study
from icl_lens.study.predict import label_tokens
from icl_lens.study.records import Records
from icl_lens.study.settings import StudySettings

__all__ = ["check_label_words", "intervene", "intervene_runs"]


def check_label_words(model, task: Task) -> None:
    """Refuse, before anything runs, label words of several tokens: the interventions
    read each label word's logit at the prediction position."""
    spec = task.spec
    tok = adapt(model).model.tokenizer
    context = spec.format_query(task.validation[0]) if task.validation else None
    labels = label_tokens(tok, spec, context=context)
    if labels.single_token:
        return
    words = ", ".join(
        f"{w!r} ({len(ids)} tokens)" for w, ids in zip(spec.label_words, labels.ids, strict=True)
    )
    raise ValueError(
        "the interventions read each label word's logit at the prediction position, so "
        f"every label word must be one token; under this tokenizer: {words}; choose "
        "one-token label words (label_words=..., --label-words)"
    )


def _n_stages(s: StudySettings, n_layers: int) -> int:
    return 1 + 1 + n_layers + 1 + 3 + len(s.lr_values) + 1


def intervene(
    model,
    task: Task | str | os.PathLike,
    settings: StudySettings | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **options,
) -> Interventions:
    """The causal tests of the dual form on ``task`` with one demonstration set
    (``settings.seed``), as :func:`~icl_lens.compare` plans it.

    ``settings`` / ``options``: a :class:`~icl_lens.study.settings.StudySettings` and
    any of its fields (``shots``, ``seed``, ``max_queries``, ``fit_queries``,
    ``other_task``, ``lr_grid``, ...). ``checkpoint_dir``: save finished stages there
    and resume from them; the comparison's directory reuses its FT.
    Label words must be one token each.

    >>> res = intervene(model, "sst2", shots=16, max_queries=32)        # doctest: +SKIP
    >>> res.frame.query("scope == 'top_k' and quantity == 'recovered'")  # doctest: +SKIP
    """
    s = StudySettings.of(settings, **options)
    adapter = adapt(model)
    if not isinstance(task, Task):
        task = load_task(task)
    check_label_words(adapter, task)
    plan = plan_study(adapter, task, s)
    store = Checkpoints(checkpoint_dir, plan.config) if checkpoint_dir is not None else None
    bar = tqdm(
        total=_n_stages(s, adapter.n_layers),
        desc=f"interventions {task.name}",
        disable=not progress,
    )
    run = StudyRun(adapter, plan, Stages(store, None, (), bar), progress)
    study = InterventionStages(run)
    fit = study.fit()
    scales, ranking = fit["scales"], [tuple(h) for h in fit["ranking"]]
    parts = [study.base(fit)]
    trials, lr, edge, ft = chosen_ft(run, s.ft_modes[0])
    ft_scores = Records.from_dict(ft["records"]).class_scores
    parts.append({"conditions": [condition("ft")], "logits": ft_scores[:, None]})
    parts += [study.layer(layer, scales) for layer in range(adapter.n_layers)]
    parts.append(study.curves(ranking, scales))
    controls = {"permuted_labels": study.permuted(scales), "other_task": study.other(scales)}
    controls["random_update"] = study.random_update(scales)
    parts += [c for c in controls.values() if c is not None]
    bar.close()

    conditions = [c for p in parts for c in p["conditions"]]
    logits = torch.cat([p["logits"].float() for p in parts], dim=1)
    table = pd.DataFrame(conditions)
    gold = torch.tensor(plan.gold, dtype=torch.long)
    frame = intervention_frame(
        [(logits.numpy(), gold.numpy())], table, n_resamples=s.n_resamples, seed=s.seed
    )
    flags = list(study.flags)
    if edge:
        flags.append(f"{s.ft_modes[0]} FT: {edge}")
    if fit["n_fit"] < s.fit_queries:
        flags.append(
            f"scales fitted on {fit['n_fit']} held-out examples, fewer than fit_queries="
            f"{s.fit_queries}: the task has no more beyond the demonstrations"
        )
    info = {
        "task": task.name,
        "seed": s.seed,
        "n_queries": len(plan.queries),
        "k_requested": s.shots,
        "k_effective": plan.fit.k_effective,
        "demonstration_tokens": int(len(plan.prefix) - 1),
        "label_tokens": list(study.labels),
        "model_line": adapter.line,
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "fit_queries": {"requested": s.fit_queries, "used": fit["n_fit"], "texts": fit["texts"]},
        "fit_margins": fit["margins"],
        "zero_update_heads": fit["zero_update_heads"],
        "necessity_on_fit": fit["necessity"].tolist(),
        "task_vector": {"accuracy_on_fit": fit["tv_accuracy"], "margin_on_fit": fit["tv_margin"]},
        "ft": {"mode": s.ft_modes[0], "lr": lr},
        "random_draws": N_RANDOM_DRAWS,
        "controls": {k: (v or {}).get("info") for k, v in controls.items()},
        **parts[0]["info"],
    }
    info["controls"]["random_update"] = {
        "norms": controls["random_update"]["info"]["norms"].tolist()
    }
    return Interventions(
        frame=frame,
        scales=scales,
        ranking=ranking,
        task_vector_layer=int(fit["tv_layer"]),
        info=info,
        conditions=table,
        label_logits=logits,
        gold=gold,
        flags=flags,
        prompt=plan.prompt,
        queries=list(plan.queries),
        label_ids=tuple(study.labels),
        stages={
            "loaded": list(store.loaded) if store else [],
            "computed": list(store.computed) if store else [],
        },
    )


def intervene_runs(
    model,
    task: Task | str | os.PathLike,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    checkpoint_dir: str | os.PathLike | None = None,
    **kwargs,
) -> InterventionSet:
    """:func:`intervene` for every seed (demonstration set); ``.table()`` gives the
    intervals over them. ``checkpoint_dir``: one sub-directory per seed, those of
    :func:`~icl_lens.compare_runs` (``seed-S/order-none``), so their FT is shared.

    >>> runs = intervene_runs(model, "mr", seeds=(1, 2, 3), shots=16)   # doctest: +SKIP
    >>> runs.table().query("scope == 'model'")                          # doctest: +SKIP
    """
    if not isinstance(task, Task):
        task = load_task(task)
    runs = {}
    for seed in seeds:
        sub = None
        if checkpoint_dir is not None:
            sub = Path(checkpoint_dir) / f"seed-{seed}" / "order-none"
        runs[seed] = intervene(model, task, seed=seed, checkpoint_dir=sub, **kwargs)
    return InterventionSet(runs)
