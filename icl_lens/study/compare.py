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

import functools
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

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
from icl_lens.study.checkpoint import Checkpoints, Stages, fingerprint_model, fingerprint_task
from icl_lens.study.comparison import Comparison
from icl_lens.study.finetune import FT_MODES, finetune
from icl_lens.study.lr_search import BestTrial, LrTrial, lr_edge_flag, next_lr, run_trial, select_lr
from icl_lens.study.lr_search import lr_grid as resolve_lr_grid
from icl_lens.study.measure import (
    FT_RETEST,
    ICL_RETEST,
    control_rows,
    control_values,
    draw_spread,
    flagged_frame,
    mean_accuracy,
    measure,
    rec2ftp_counts,
    retest_rows,
    retest_values,
    token_scores,
)
from icl_lens.study.orders import block_index, block_lengths, kept_columns, other_order
from icl_lens.study.predict import label_tokens, predict_queries
from icl_lens.study.records import PROTOCOLS, Records, record

__all__ = ["LR_SELECTIONS", "compare", "ft_modes"]

LR_SELECTIONS = ("queries", "holdout")
"""``queries``: choose the FT learning rate on the measured queries (the authors');
``holdout``: on training examples that are neither demonstrations nor measured."""


def ft_modes(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"standard"``, ``"layer_causal"``, ``"both"`` or a sequence of modes.

    >>> ft_modes("both")
    ('standard', 'layer_causal')
    """
    modes = FT_MODES if spec == "both" else (spec,) if isinstance(spec, str) else tuple(spec)
    unknown = [m for m in modes if m not in FT_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown FT mode {spec!r}; choose from {FT_MODES} or 'both'")
    return tuple(dict.fromkeys(modes))


def ft_key(mode: str, modes: Sequence[str]) -> str:
    """The accuracy / predictions key of a mode: ``"ft"`` for the first, else
    ``"ft_<mode>"``."""
    return "ft" if mode == modes[0] else f"ft_{mode}"


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


def _holdout(task, demos, size: int | None, seed: int):
    """Training examples that are not demonstrations, seeded: the lr-selection split."""
    chosen = {id(d) for d in demos}
    pool = [ex for ex in task.train if id(ex) not in chosen]
    if not pool:
        raise ValueError(
            f"lr_selection='holdout' needs training examples beyond the {len(demos)} "
            f"demonstrations, and task {task.spec.name!r} has none: use a larger train split "
            "or lr_selection='queries'"
        )
    order = np.random.default_rng([int(seed), 4]).permutation(len(pool))
    n = len(pool) if size is None else min(size, len(pool))
    return [pool[i] for i in order[:n]]


def compare(
    model,
    task: Task | str | os.PathLike,
    *,
    shots: int = 32,
    seed: int = 1,
    order_seed: int | None = None,
    balanced: bool = False,
    lr_grid: str | Sequence[float] = "paper",
    lr_extend: int = 2,
    lr_selection: str = "queries",
    lr_holdout: int | None = None,
    max_queries: int | None = None,
    protocol: str = "prediction",
    ft_mode: str | Sequence[str] = "standard",
    kendall_queries: int | None = 100,
    retest: bool = True,
    retest_seed: int = 0,
    control: bool = True,
    control_seed: int = 0,
    n_draws: int = 3,
    batch_size: int = 8,
    n_resamples: int = 1000,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shared: dict | None = None,
) -> Comparison:
    """ZSL vs ICL vs FT on ``task`` with ``shots`` demonstrations drawn with ``seed``.

    ``task``: a :class:`~icl_lens.data.tasks.Task`, a paper task name or a local file
    (:func:`~icl_lens.data.task_sources.load_task`). ``max_queries`` caps the validation
    queries (after the task's own cap). ``lr_grid``: ``"paper"`` (36 values),
    ``"short"`` (4) or learning rates; ``lr_extend``: at most that many extra rates past
    an edge of the grid where the best one sits (0: none; the flag says how to extend).
    ``lr_selection``: ``"queries"`` (the measured queries, as the authors) or
    ``"holdout"`` (``lr_holdout`` training examples that are not demonstrations; default
    as many as there are validation queries, or all there are). ``protocol``:
    ``"prediction"`` (record at the prediction position) or ``"dai2023"`` (the authors'
    code in each point: an appended first-candidate label token, BOS out of SimAM, FT on
    ``BOS + input + label``, Kendall and top-k over the demonstrations' own tokens).
    ``ft_mode``: ``"standard"``, ``"layer_causal"`` or ``"both"``. ``kendall_queries``:
    Kendall and top-k use the first that many queries (100 as the authors). ``retest``:
    measure ICL vs ICL and FT vs FT in another order (``retest_seed``). ``control``: also
    run the untrained-weights control, ``n_draws`` random draws. ``checkpoint_dir``: save
    finished stages there and resume from them. ``shared``: a dict passed to several
    calls on the same model and queries (:func:`~icl_lens.study.runs.compare_runs` does)
    to compute the ZSL recordings once.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise ValueError(
            f"shots must be >= 1, got {shots!r}: ICL and the finetuning baseline both learn "
            "from the demonstrations"
        )
    if lr_selection not in LR_SELECTIONS:
        raise ValueError(f"unknown lr_selection {lr_selection!r}; choose from {LR_SELECTIONS}")
    if control and n_draws < 1:
        raise ValueError(f"the control needs n_draws >= 1, got {n_draws}")
    modes = ft_modes(ft_mode)
    grid = resolve_lr_grid(lr_grid)
    adapter = adapt(model)
    model = adapter.model  # a model or its adapter may be passed
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
    # the authors keep a demonstration while BOS + demonstrations + their longest
    # BOS + query + label stays strictly below the context (fewshot_task.py:62): 2 fewer
    room = adapter.n_ctx - (2 if protocol == "dai2023" else 0)
    fit = fit_to_context(demos, room, demonstration_token_counter(spec, tok), budget)
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
    demos = list(fit.demonstrations)
    prompt = task_prompt(tok, spec, demos, validation[0], n_ctx=adapter.n_ctx)
    _check_finite_logits(adapter, prompt)
    prefix, bos = prompt.prefix, prompt.prefix[:1]
    separators = protocol != "dai2023"  # the authors train on BOS + input + label
    columns = kept_columns(prompt, separators=separators)
    groups = block_lengths(prompt, separators=separators)

    def encoded(examples):
        return [
            torch.tensor(encode(tok, spec.format_query(ex)), dtype=torch.long) for ex in examples
        ]

    queries, gold = encoded(validation), [ex.label for ex in validation]
    if lr_selection == "holdout":
        held = _holdout(task, demos, len(validation) if lr_holdout is None else lr_holdout, seed)
        select_queries, select_gold = encoded(held), [ex.label for ex in held]
    else:
        select_queries, select_gold = queries, gold
    retest_order = other_order(len(demos), seed=retest_seed) if retest and len(demos) > 1 else None

    config = {
        "model": fingerprint_model(model),
        "task": fingerprint_task(task),
        "task_name": spec.name,
        "shots": shots,
        "seed": seed,
        "order_seed": order_seed,
        "balanced": balanced,
        "lr_grid": list(grid),
        "lr_extend": lr_extend,
        "lr_selection": lr_selection,
        "lr_holdout": len(select_queries) if lr_selection == "holdout" else None,
        "n_queries": len(validation),
        "protocol": protocol,
        "ft_mode": list(modes),
        "kendall_queries": kendall_queries,
        "retest": retest,
        "retest_seed": retest_seed,
        "control": control,
        "control_seed": control_seed,
        "n_draws": n_draws if control else 0,
        "n_resamples": n_resamples,
    }
    store = Checkpoints(checkpoint_dir, config) if checkpoint_dir is not None else None
    memo_key = tuple(
        config[k]
        for k in ("model", "task", "n_queries", "protocol", "kendall_queries", "control_seed")
    )
    n_ft = len(modes) * (len(grid) + 1 + bool(retest_order))
    n_stages = 2 + bool(retest_order) + n_ft + (n_draws * (2 + len(modes)) if control else 0)
    bar = tqdm(total=n_stages, desc=f"compare {spec.name}", disable=not progress)
    stages = Stages(store, shared, memo_key, bar)
    rec_opts = {
        "gold": gold,
        "protocol": protocol,
        "keep_queries": kendall_queries,
        "batch_size": batch_size,
        "progress": progress,
    }
    ft_opts = {"separators": separators}
    scale = 1.0 / adapter.d_head  # the authors' recorded q is scaled by d_head ** -0.5

    def run_ft(name, get_model, demonstrations, lr, mode, reuse=lambda: None) -> dict:
        ft = reuse() or finetune(
            get_model(), demonstrations, lr=lr, mode=mode, progress=progress, **ft_opts
        )
        if ft.diverged:
            return {"diverged": True, "losses": ft.losses.tolist()}
        rec = record(adapter.with_model(ft.model), bos, queries, labels, desc=name, **rec_opts)
        return {
            "diverged": False,
            "losses": ft.losses.tolist(),
            "records": rec.to_dict(),
            "train_queries": ft.train_queries,
        }

    def evaluate(ft_model):
        return predict_queries(
            adapter.with_model(ft_model),
            bos,
            select_queries,
            labels,
            gold=select_gold,
            batch_size=batch_size,
        )

    # ---- ZSL, ICL, ICL in another order ---------------------------------------------
    zsl = stages.records(
        "zsl",
        lambda: record(adapter, bos, queries, labels, desc="zsl", **rec_opts),
        share=True,
    )
    icl = stages.records(
        "icl", lambda: record(adapter, prefix, queries, labels, desc="icl", **rec_opts)
    )
    icl_tokens = token_scores(icl, columns=columns)
    if retest_order is not None:
        prompt2 = task_prompt(
            tok, spec, [demos[i] for i in retest_order], validation[0], n_ctx=adapter.n_ctx
        )
        icl2 = stages.records(
            "icl-retest",
            lambda: record(adapter, prompt2.prefix, queries, labels, desc="icl-retest", **rec_opts),
        )
        back = block_index(block_lengths(prompt), retest_order)
        icl2_tokens = token_scores(icl2)[..., back]
        icl2_tokens = icl2_tokens if columns is None else icl2_tokens[..., columns]
        train_back = block_index(groups, retest_order)

    opts = {"seed": seed, "kendall_queries": kendall_queries, "n_resamples": n_resamples}
    accuracy = {"zsl": zsl.accuracy, "icl": icl.accuracy}
    predictions = {"gold": gold, "zsl": zsl.predictions.predicted.tolist()}
    predictions["icl"] = icl.predictions.predicted.tolist()
    frames, results, per_mode, flags, values = [], {}, {}, [], {}
    retest_info = None
    if retest_order is not None:
        icl_rt = measure(
            zsl, icl, icl2, tokens=(icl_tokens, icl2_tokens), groups=groups, baselines=False, **opts
        )
        retest_info = {"order": retest_order, "accuracy": {"icl": icl2.accuracy}}
    elif retest:
        flags.append("no test-retest ceilings: they need at least 2 demonstrations")

    # ---- FT, per mode -------------------------------------------------------------
    chosen = {}
    for mode in modes:
        tag = "" if mode == "standard" else f"{mode}-"
        trials: list[LrTrial] = []
        kept = BestTrial(adapter)  # the chosen lr's finetuned copy is rebuilt, not trained again

        def trial(lr, mode=mode, kept=kept):
            return run_trial(adapter, prompt, lr, evaluate, keep=kept.offer, mode=mode, **ft_opts)

        for lr in grid:
            trials.append(
                LrTrial(**stages.get(f"{tag}lr={lr!r}", lambda lr=lr: trial(lr).to_dict()))
            )
        while (lr := next_lr(trials, grid=grid, max_extra=lr_extend)) is not None:
            bar.total += 1
            trials.append(
                LrTrial(**stages.get(f"{tag}lr={lr!r}", lambda lr=lr: trial(lr).to_dict()))
            )
        best = select_lr(trials)
        chosen[mode] = best.lr
        edge = lr_edge_flag(trials, grid=grid, max_extra=lr_extend)
        if edge:
            flags.append(f"{mode} FT: {edge}")
        ft = stages.get(
            f"{tag}ft",
            lambda mode=mode, tag=tag, kept=kept, best=best: run_ft(
                f"{tag}ft",
                lambda: adapter,
                prompt,
                best.lr,
                mode,
                reuse=lambda: kept.take(adapter, best.lr),
            ),
        )
        if ft["diverged"]:  # cannot happen for a deterministic rerun of a converged trial
            raise RuntimeError(f"finetuning at the selected lr={best.lr:g} diverged on its rerun")
        ft_rec = Records.from_dict(ft["records"])
        ft_tokens = token_scores(ft_rec, ft["train_queries"], scale=scale)
        main = measure(zsl, icl, ft_rec, tokens=(icl_tokens, ft_tokens), groups=groups, **opts)
        parts = [main.frame]
        mode_values = {k: {(): v} for k, v in main.values().items()}
        if retest_order is not None:
            parts.append(retest_rows(icl_rt, ICL_RETEST))
            mode_values.update(retest_values(icl_rt, ICL_RETEST))
            ft2 = stages.get(
                f"{tag}ft-retest",
                lambda mode=mode, tag=tag, best=best: run_ft(
                    f"{tag}ft-retest", lambda: adapter, prompt2, best.lr, mode
                ),
            )
            if ft2["diverged"]:
                flags.append(f"{mode} FT: no ft_retest, training in the other order diverged")
            else:
                ft2_rec = Records.from_dict(ft2["records"])
                ft2_tokens = token_scores(ft2_rec, ft2["train_queries"], scale=scale)
                ft2_tokens = ft2_tokens[..., train_back]
                ft_rt = measure(
                    zsl,
                    ft_rec,
                    ft2_rec,
                    tokens=(ft_tokens, ft2_tokens),
                    groups=groups,
                    baselines=False,
                    **opts,
                )
                parts.append(retest_rows(ft_rt, FT_RETEST))
                mode_values.update(retest_values(ft_rt, FT_RETEST))
                retest_info["accuracy"][ft_key(mode, modes)] = ft2_rec.accuracy
        key = ft_key(mode, modes)
        accuracy[key] = ft_rec.accuracy
        predictions[key] = ft_rec.predictions.predicted.tolist()
        results[mode] = main.results
        per_mode[mode] = {
            "accuracy": ft_rec.accuracy,
            "lr": best.lr,
            "lr_search": [t.to_dict() for t in trials],
            "lr_flag": edge,
            "rec2ftp_counts": rec2ftp_counts(main.results["rec2ftp"]),
        }
        frames.append((mode, parts))
        values[mode] = mode_values

    # ---- the untrained-weights control ------------------------------------------------
    control_info = None
    if control:
        control_info = {
            "n_draws": n_draws,
            "seeds": [control_seed + i for i in range(n_draws)],
            "lr": dict(chosen),
            "draws": [],
        }
        draws_by_mode: dict[str, list] = {m: [] for m in modes}
        for i in range(n_draws):
            untrained = functools.cache(
                lambda i=i: adapter.with_model(untrained_copy(adapter, seed=control_seed + i))
            )
            c_tag = f"control-{i}-"
            c_zsl = stages.records(
                c_tag + "zsl",
                lambda u=untrained, d=c_tag + "zsl": record(
                    u(), bos, queries, labels, desc=d, **rec_opts
                ),
                share=True,
            )
            c_icl = stages.records(
                c_tag + "icl",
                lambda u=untrained, d=c_tag + "icl": record(
                    u(), prefix, queries, labels, desc=d, **rec_opts
                ),
            )
            draw = {
                "seed": control_seed + i,
                "accuracy": {"zsl": c_zsl.accuracy, "icl": c_icl.accuracy},
            }
            draw["ft_diverged"] = {}
            c_icl_tokens = token_scores(c_icl, columns=columns)
            for mode in modes:
                tag = "" if mode == "standard" else f"{mode}-"
                c_ft = stages.get(
                    c_tag + tag + "ft",
                    lambda u=untrained, mode=mode, d=c_tag + tag + "ft": run_ft(
                        d, u, prompt, chosen[mode], mode
                    ),
                )
                draw["ft_diverged"][mode] = c_ft["diverged"]
                if c_ft["diverged"]:
                    continue
                c_ft_rec = Records.from_dict(c_ft["records"])
                draw["accuracy"][ft_key(mode, modes)] = c_ft_rec.accuracy
                c_ft_tokens = token_scores(c_ft_rec, c_ft["train_queries"], scale=scale)
                draws_by_mode[mode].append(
                    measure(
                        c_zsl,
                        c_icl,
                        c_ft_rec,
                        tokens=(c_icl_tokens, c_ft_tokens),
                        groups=groups,
                        baselines=False,
                        **opts,
                    )
                )
            control_info["draws"].append(draw)
            del untrained
        control_info["accuracy"] = mean_accuracy(control_info["draws"])
        control_info["spread"] = {}
        for mode, parts in frames:
            draws = draws_by_mode[mode]
            if not draws:
                flags.append(f"{mode} FT: no untrained-weights control, every draw diverged")
                continue
            parts.append(control_rows(draws, seed=seed, n_resamples=n_resamples))
            control_info["spread"][mode] = draw_spread(draws)
            for key, v in control_values(draws).items():
                values[mode][key] = v
    bar.close()

    frame = flagged_frame(frames, {m: results[m]["rec2ftp"] for m in modes})
    primary = modes[0]
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
        "rec2ftp_counts": per_mode[primary]["rec2ftp_counts"],
        "retest": retest_info,
    }
    result = Comparison(
        accuracy=accuracy,
        frame=frame,
        predictions=predictions,
        lr=chosen[primary],
        lr_search=per_mode[primary]["lr_search"],
        control=control_info,
        config={k: v for k, v in config.items() if k not in ("model", "task")},
        info=info,
        results=results[primary],
        prompt=prompt,
        spec=spec,
        ft_modes=per_mode,
        flags=flags,
    )
    result.values = {
        (m, v, b, mode): runs for mode in modes for (m, v, b), runs in values[mode].items()
    }
    result.stages = {
        "loaded": list(store.loaded) if store else [],
        "computed": list(store.computed) if store else [],
    }
    return result
