"""What a study measures, fixed before any forward pass: queries, demonstrations, prompts.

:func:`plan_study` turns a model, a task and :class:`~icl_lens.study.settings.StudySettings`
into a :class:`StudyPlan`: the validation queries and their label tokens, the
demonstrations drawn with the seed (re-ordered with the order seed) and those that fit
the context, the ICL prompt, what FT trains on, the lr-selection queries, the other
order of the test-retest ceilings, and the configuration a checkpoint directory is
bound to. :func:`~icl_lens.compare` and the interventions read the same plan.

Context: demonstrations are kept while BOS + demonstrations + the longest query (and
label word) fit the model's context. Under ``protocol="dai2023"`` as in the authors' code
(LMOps ``struprompting/tasks/fewshot_task.py``): the longest query is taken over every
validation example the task holds (``max_valid_len``), not only the measured ones; the
prompt must stay strictly below the context (2 tokens fewer); and FT trains on all the
drawn demonstrations (``get_data_for_ft`` does not fit them to a context), while Kendall
and top-k compare the demonstrations both sides hold.

>>> import icl_lens as il                                                 # doctest: +SKIP
>>> plan = plan_study(il.adapt(model), task, StudySettings(shots=8))      # doctest: +SKIP
>>> plan.fit.k_effective, len(plan.queries)                               # doctest: +SKIP
(8, 872)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from icl_lens.data.demonstrations import (
    ContextFit,
    demonstration_token_counter,
    fit_to_context,
    query_token_budget,
    sample_demonstrations,
)
from icl_lens.data.prompts import Prompt, encode, task_prompt
from icl_lens.data.tasks import Example, Task
from icl_lens.study.checkpoint import fingerprint_model, fingerprint_task
from icl_lens.study.orders import block_index, block_lengths, kept_columns, other_order
from icl_lens.study.predict import LabelTokens, label_tokens
from icl_lens.study.settings import StudySettings

__all__ = ["StudyPlan", "plan_study"]

UNBOUND = ("max_queries", "lr_grid", "batch_size", "interventions", "fit_queries", "other_task")
"""Settings a checkpoint directory is not bound to as given: the queries and the grid
are bound as resolved (``n_queries``, ``lr_grid``), the batch size not at all, nor the
interventions' settings (their stages name what they depend on), so that adding
``--interventions`` to a finished run reuses every stage of the comparison."""


@dataclass
class StudyPlan:
    """The queries, demonstrations and prompts of one study (see the module docstring).

    ``demos``: the demonstrations of the ICL prompt, in order; ``ft_demos``: what FT
    trains on, in order (``demos``, or under ``dai2023`` every drawn demonstration, of
    which ``demos`` are the first that fit). ``columns``: the ICL prompt's demonstration
    tokens that the token-level metrics compare (None: all); ``ft_columns``: FT's
    training tokens that align with them (None: all). ``groups``: tokens per compared
    demonstration. ``retest_order`` / ``ft_retest_order``: the other order of the
    ceilings (None without them), with ``retest_prompt`` / ``ft_retest_prompt``.
    """

    settings: StudySettings
    task: Task
    validation: list[Example]
    labels: LabelTokens
    fit: ContextFit
    demos: list[Example]
    ft_demos: list[Example]
    prompt: Prompt
    ft_prompt: Prompt
    queries: list[Int[Tensor, " pos"]]
    gold: list[int]
    select_queries: list[Int[Tensor, " pos"]]
    select_gold: list[int]
    columns: Int[Tensor, " token"] | None
    ft_columns: Int[Tensor, " token"] | None
    groups: list[int]
    retest_order: list[int] | None
    retest_prompt: Prompt | None
    ft_retest_order: list[int] | None
    ft_retest_prompt: Prompt | None
    config: dict[str, Any]

    @property
    def spec(self):
        return self.task.spec

    @property
    def prefix(self) -> Int[Tensor, " prefix"]:
        """BOS + demonstrations: what every ICL query follows."""
        return self.prompt.prefix

    @property
    def bos(self) -> Int[Tensor, " 1"]:
        """What every zero-shot (and FT) query follows."""
        return self.prompt.prefix[:1]

    @property
    def separators(self) -> bool:
        """Whether FT trains on the separators (the authors' FT leaves them out)."""
        return self.settings.protocol != "dai2023"

    def retest_back(self, ft: bool = False) -> Int[Tensor, " token"]:
        """Index that puts the other order's token axis back in the first order (ICL's,
        or FT's training tokens with ``ft``)."""
        if ft:
            lengths = block_lengths(self.ft_prompt, separators=self.separators)
            return block_index(lengths, self.ft_retest_order)
        return block_index(block_lengths(self.prompt), self.retest_order)


def _holdout(task: Task, demos: list[Example], size: int | None, seed: int) -> list[Example]:
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


def _fit(adapter, task: Task, demos, validation, settings: StudySettings, shots) -> ContextFit:
    spec, tok = task.spec, adapter.model.tokenizer
    dai = settings.protocol == "dai2023"
    # the authors reserve their longest validation example (all of them, capped at 2000)
    budget = query_token_budget(spec, task.validation if dai else validation, tok)
    # and keep a demonstration while the whole stays strictly below the context
    # (fewshot_task.py: `len(context) + len(demo) + max_valid_len < gpt_maxlen`): 2 fewer
    room = adapter.n_ctx - (2 if dai else 0)
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
        trains = "; FT still trains on all of them, as the authors'" if dai else ""
        warnings.warn(
            f"{fit.n_dropped} of {shots} demonstrations do not fit the context of "
            f"{adapter.n_ctx} tokens; using k={fit.k_effective} in the prompt{trains}",
            stacklevel=4,  # compare's caller
        )
    return fit


def _aligned_columns(plan_prompt: Prompt, ft_prompt: Prompt, demos, ft_demos, separators):
    """FT training-token columns of the demonstrations the ICL prompt holds (None when FT
    trains on exactly the prompt's demonstrations)."""
    if len(ft_demos) == len(demos):
        return None
    lengths = block_lengths(ft_prompt, separators=separators)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    where = {id(ex): i for i, ex in enumerate(ft_demos)}
    blocks = [where[id(ex)] for ex in demos]
    return torch.cat([torch.arange(starts[b], starts[b + 1]) for b in blocks])


def plan_study(adapter, task: Task, settings: StudySettings) -> StudyPlan:
    """The :class:`StudyPlan` of ``task`` under ``settings`` on ``adapter``'s model."""
    s = settings
    model, spec = adapter.model, task.spec
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; load it with icl_lens.load_model")
    validation = task.validation[: s.max_queries] if s.max_queries else list(task.validation)
    if not validation:
        raise ValueError(f"task {spec.name!r} has no validation examples to compare on")
    labels = label_tokens(tok, spec, context=spec.format_query(validation[0]))

    drawn = sample_demonstrations(task, s.shots, seed=s.seed, balanced=s.balanced)
    if s.order_seed is not None:
        drawn = [drawn[i] for i in np.random.default_rng(s.order_seed).permutation(len(drawn))]
    fit = _fit(adapter, task, drawn, validation, s, s.shots)
    demos = list(fit.demonstrations)
    ft_demos = drawn if s.protocol == "dai2023" else demos
    prompt = task_prompt(tok, spec, demos, validation[0], n_ctx=adapter.n_ctx)
    ft_prompt = prompt if ft_demos is demos else task_prompt(tok, spec, ft_demos, validation[0])
    separators = s.protocol != "dai2023"

    def encoded(examples):
        return [
            torch.tensor(encode(tok, spec.format_query(ex)), dtype=torch.long) for ex in examples
        ]

    queries, gold = encoded(validation), [ex.label for ex in validation]
    if s.lr_selection == "holdout":
        size = len(validation) if s.lr_holdout is None else s.lr_holdout
        held = _holdout(task, ft_demos, size, s.seed)
        select_queries, select_gold = encoded(held), [ex.label for ex in held]
    else:
        select_queries, select_gold = queries, gold

    retest = s.retest and len(demos) > 1
    order = other_order(len(demos), seed=s.retest_seed) if retest else None
    retest_prompt = ft_order = ft_retest_prompt = None
    if order is not None:
        retest_prompt = task_prompt(
            tok, spec, [demos[i] for i in order], validation[0], n_ctx=adapter.n_ctx
        )
        ft_order = order if ft_demos is demos else other_order(len(ft_demos), seed=s.retest_seed)
        ft_retest_prompt = (
            retest_prompt
            if ft_demos is demos
            else task_prompt(tok, spec, [ft_demos[i] for i in ft_order], validation[0])
        )
    config = {
        "model": fingerprint_model(model),
        "task": fingerprint_task(task),
        "task_name": spec.name,
        **{k: v for k, v in s.to_dict().items() if k not in UNBOUND},
        "lr_grid": list(s.lr_values),
        "lr_holdout": len(select_queries) if s.lr_selection == "holdout" else None,
        "n_queries": len(validation),
        "n_draws": s.n_draws if s.control else 0,
    }
    if ft_demos is not demos:
        config["k_ft"] = len(ft_demos)
    return StudyPlan(
        settings=s,
        task=task,
        validation=validation,
        labels=labels,
        fit=fit,
        demos=demos,
        ft_demos=ft_demos,
        prompt=prompt,
        ft_prompt=ft_prompt,
        queries=queries,
        gold=gold,
        select_queries=select_queries,
        select_gold=select_gold,
        columns=kept_columns(prompt, separators=separators),
        ft_columns=_aligned_columns(prompt, ft_prompt, demos, ft_demos, separators),
        groups=block_lengths(prompt, separators=separators),
        retest_order=order,
        retest_prompt=retest_prompt,
        ft_retest_order=ft_order,
        ft_retest_prompt=ft_retest_prompt,
        config=config,
    )
