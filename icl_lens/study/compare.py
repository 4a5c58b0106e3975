"""Does ICL behave like finetuning on this model and task? (user story 2)

:func:`compare` runs the paper's pipeline (method.md sections 1 and 3) on the same
validation queries:

1. demonstrations: the train split shuffled with ``seed``, the first ``shots`` (or a
   class-balanced draw), optionally re-ordered with ``order_seed``; those that do not
   fit the context are dropped (``info["k_effective"]``);
2. ZSL and ICL: restricted prediction and recordings (:mod:`icl_lens.study.records`);
3. FT, per FT mode (``"standard"``, Deutch et al.'s ``"layer_causal"``, or ``"both"``):
   K/V-only SGD on the demonstrations in ICL order, the learning rate chosen by accuracy
   over the grid (a diverged rate is recorded, the grid goes on; a rate that wins at an
   edge extends the grid past it, at most ``lr_extend`` rates, and is flagged), on the
   measured queries as the authors did (``lr_selection="queries"``) or on held-out
   training examples (``"holdout"``); then recordings of the chosen FT model and its
   training-token query vectors;
4. the test-retest ceilings (``retest``): ICL again with the same demonstrations in
   another order, FT trained again in that order;
5. the metrics with their baselines and bootstrap CIs (:mod:`icl_lens.study.measure`),
   the retests as ``icl_retest`` / ``ft_retest`` rows, and flags where a value cannot
   speak (``flag`` column; run-level flags in ``Comparison.flags``);
6. the untrained-weights control: steps 2-3 again on ``n_draws`` copies of the model
   with random weights (:func:`icl_lens.model.untrained.untrained_copy`, seeds
   ``control_seed + i``), FT at the learning rate chosen for the real model, reported as
   ``baseline == "untrained_weights"`` rows: the mean over draws, with an interval over
   draws, then queries.

With ``checkpoint_dir`` every finished stage (a setting's recordings, one learning
rate) is saved atomically and a rerun with the same arguments resumes where it stopped.

>>> import icl_lens as il                                        # doctest: +SKIP
>>> cmp = il.compare(model, "sst2", shots=32, seed=1)            # doctest: +SKIP
>>> cmp.accuracy                                                 # doctest: +SKIP
{'zsl': 0.70, 'icl': 0.92, 'ft': 0.74}
>>> cmp.metrics()                                                # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Task
from icl_lens.hooks.logits import logit_hook
from icl_lens.model.adapter import adapt
from icl_lens.study.checkpoint import Checkpoints, Stages
from icl_lens.study.comparison import Comparison
from icl_lens.study.measure import (
    control_rows,
    control_values,
    draw_spread,
    flagged_frame,
    mean_accuracy,
    measure,
)
from icl_lens.study.pipeline import StudyRun, finetune_mode, ft_key, untrained_control
from icl_lens.study.plan import plan_study
from icl_lens.study.settings import LR_SELECTIONS, StudySettings

__all__ = ["LR_SELECTIONS", "compare", "ft_modes"]


def ft_modes(spec) -> tuple[str, ...]:
    """``"standard"``, ``"layer_causal"``, ``"both"`` or a sequence of modes.

    >>> ft_modes("both")
    ('standard', 'layer_causal')
    """
    return StudySettings(ft_mode=spec).ft_modes


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


def _n_stages(s: StudySettings, retest: bool) -> int:
    n_ft = len(s.ft_modes) * (len(s.lr_values) + 1 + retest)
    return 2 + retest + n_ft + (s.n_draws * (2 + len(s.ft_modes)) if s.control else 0)


def compare(
    model,
    task: Task | str | os.PathLike,
    settings: StudySettings | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shared: dict | None = None,
    **options,
) -> Comparison:
    """ZSL vs ICL vs FT on ``task`` with the demonstrations and options of ``settings``.

    ``task``: a :class:`~icl_lens.data.tasks.Task`, a paper task name or a local file
    (:func:`~icl_lens.data.task_sources.load_task`). ``settings``: a
    :class:`~icl_lens.study.settings.StudySettings` (its docstring lists every option:
    shots, seed, order_seed, max_queries, protocol, ft_mode, lr_grid, lr_selection,
    kendall_queries, retest, control, n_draws, ...); ``options``: any of its fields,
    over ``settings`` (``compare(model, "sst2", shots=8, seed=2)``). A setting that
    cannot work raises :class:`~icl_lens.study.settings.SettingsError` before anything
    runs. ``checkpoint_dir``: save finished stages there and resume from them.
    ``shared``: a dict passed to several calls on the same model and queries
    (:func:`~icl_lens.study.runs.compare_runs` does) to compute the ZSL recordings once.
    """
    s = StudySettings.of(settings, **options)
    adapter = adapt(model)
    if not isinstance(task, Task):
        task = load_task(task)
    plan = plan_study(adapter, task, s)
    _check_finite_logits(adapter, plan.prompt)
    c = plan.config
    store = Checkpoints(checkpoint_dir, c) if checkpoint_dir is not None else None
    memo_key = tuple(
        c[k] for k in ("model", "task", "n_queries", "protocol", "kendall_queries", "control_seed")
    )
    retest = plan.retest_order is not None
    bar = tqdm(total=_n_stages(s, retest), desc=f"compare {task.name}", disable=not progress)
    run = StudyRun(adapter, plan, Stages(store, shared, memo_key, bar), progress)

    # ---- ZSL, ICL, ICL in another order ---------------------------------------------
    zsl = run.record("zsl", lambda: adapter, plan.bos, share=True)
    icl = run.record("icl", lambda: adapter, plan.prefix)
    icl_tokens = run.icl_tokens(icl)
    flags, icl_retest, retest_info = [], None, None
    if retest:
        icl2 = run.record("icl-retest", lambda: adapter, plan.retest_prompt.prefix)
        icl2_tokens = run.icl_tokens(icl2, back=plan.retest_back())
        icl_retest = measure(
            zsl,
            icl,
            icl2,
            tokens=(icl_tokens, icl2_tokens),
            baselines=False,
            **run.measure_opts(),
        )
        retest_info = {"order": plan.retest_order, "accuracy": {"icl": icl2.accuracy}}
    elif s.retest:
        flags.append("no test-retest ceilings: they need at least 2 demonstrations")

    # ---- FT, per mode -------------------------------------------------------------
    modes = s.ft_modes
    outcomes = {m: finetune_mode(run, m, zsl, icl, icl_tokens, icl_retest) for m in modes}
    accuracy = {"zsl": zsl.accuracy, "icl": icl.accuracy}
    predictions = {"gold": plan.gold, "zsl": zsl.predictions.predicted.tolist()}
    predictions["icl"] = icl.predictions.predicted.tolist()
    for mode, out in outcomes.items():
        key = ft_key(mode, modes)
        accuracy[key] = out.ft.accuracy
        predictions[key] = out.ft.predictions.predicted.tolist()
        flags += out.flags
        if out.retest_accuracy is not None:
            retest_info["accuracy"][key] = out.retest_accuracy

    # ---- the untrained-weights control ----------------------------------------------
    control_info = None
    if s.control:
        control_info, draws = untrained_control(run, {m: o.lr for m, o in outcomes.items()})
        control_info["accuracy"] = mean_accuracy(control_info["draws"])
        control_info["spread"] = {}
        for mode, out in outcomes.items():
            if not draws[mode]:
                flags.append(f"{mode} FT: no untrained-weights control, every draw diverged")
                continue
            out.parts.append(control_rows(draws[mode], seed=s.seed, n_resamples=s.n_resamples))
            control_info["spread"][mode] = draw_spread(draws[mode])
            out.values.update(control_values(draws[mode]))
    bar.close()
    return _assemble(
        plan, adapter, outcomes, accuracy, predictions, control_info, retest_info, flags, store
    )


def _assemble(plan, adapter, outcomes, accuracy, predictions, control, retest, flags, store):
    """The :class:`Comparison` of a finished study."""
    modes = tuple(outcomes)
    frame = flagged_frame(
        [(m, o.parts) for m, o in outcomes.items()],
        {m: o.main.results["rec2ftp"] for m, o in outcomes.items()},
    )
    primary = outcomes[modes[0]]
    task, fit = plan.task, plan.fit
    info = {
        "task": task.name,
        "task_info": {
            k: v for k, v in task.info.items() if isinstance(v, str | int | float | type(None))
        },
        "n_queries": len(plan.validation),
        "k_requested": plan.settings.shots,
        "k_effective": fit.k_effective,
        "k_ft": len(plan.ft_demos),
        "demonstration_tokens": int(len(plan.prefix) - 1),
        "label_tokens": [list(ids) for ids in plan.labels.ids],
        "model_line": adapter.line,
        "rec2ftp_counts": primary.summary()["rec2ftp_counts"],
        "retest": retest,
    }
    result = Comparison(
        accuracy=accuracy,
        frame=frame,
        predictions=predictions,
        lr=primary.lr,
        lr_search=[t.to_dict() for t in primary.trials],
        control=control,
        config={k: v for k, v in plan.config.items() if k not in ("model", "task")},
        info=info,
        results=primary.main.results,
        prompt=plan.prompt,
        spec=plan.spec,
        ft_modes={m: o.summary() for m, o in outcomes.items()},
        flags=flags,
    )
    result.values = {
        (m, v, b, mode): runs
        for mode, o in outcomes.items()
        for (m, v, b), runs in o.values.items()
    }
    result.stages = {
        "loaded": list(store.loaded) if store else [],
        "computed": list(store.computed) if store else [],
    }
    return result
