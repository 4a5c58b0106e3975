"""What the interventions run on beyond the comparison's plan: the held-out fit queries,
the control prompts (permuted labels, another task's demonstrations) and the random
updates of the norm-matched control (docs/interventions.md).

>>> permutation_without_fixed_label(2, seed=1).tolist()
[1, 0]
>>> bool((permutation_without_fixed_label(5, seed=3) != range(5)).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_lens.data.demonstrations import (
    demonstration_token_counter,
    fit_to_context,
    query_token_budget,
    sample_demonstrations,
)
from icl_lens.data.prompts import build_prompt
from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import Example, Task, TaskSpec, normalize_task_name
from icl_lens.study.plan import StudyPlan, _holdout
from icl_lens.toy import toy_task

__all__ = [
    "PARTNERS",
    "ControlPrefix",
    "control_prefix",
    "fit_examples",
    "other_demonstrations",
    "other_task_for",
    "permutation_without_fixed_label",
    "permuted_labels",
    "random_updates",
]

PARTNERS = {
    "sst2": "subj",
    "mr": "subj",
    "subj": "sst2",
    "sst5": "agnews",
    "agnews": "sst2",
    "cb": "sst2",
}
"""The paper task whose demonstrations make each paper task's other-task control."""


def fit_examples(plan: StudyPlan, size: int) -> list[Example]:
    """Up to ``size`` training examples that are neither demonstrations (of the prompt or
    FT) nor measured (nor share a text with either), seeded as the lr-selection split
    (:func:`~icl_lens.study.plan._holdout`): where the interventions fit their scales,
    rank the heads and choose the task vector's layer."""
    spec, task = plan.spec, plan.task
    taken = {spec.format_query(ex) for ex in [*plan.validation, *plan.ft_demos]}
    exclude = [*plan.ft_demos, *(ex for ex in task.train if spec.format_query(ex) in taken)]
    left = len({id(ex) for ex in task.train} - {id(ex) for ex in exclude})
    if left == 0:
        raise ValueError(
            f"fit_queries: the interventions fit their scales on training examples that are "
            f"neither demonstrations nor measured, and task {task.name!r} has none beyond "
            f"its {len(plan.ft_demos)} demonstrations: use a larger train split or fewer shots"
        )
    return _holdout(task, exclude, size, plan.settings.seed)


def permutation_without_fixed_label(n_classes: int, *, seed: int) -> np.ndarray:
    """A seeded permutation of the classes that moves every class (for two: the swap)."""
    if n_classes < 2:
        raise ValueError("permuting labels needs at least 2 classes")
    rng = np.random.default_rng([int(seed), 21])
    while True:
        perm = rng.permutation(n_classes)
        if (perm != np.arange(n_classes)).all():
            return perm


def permuted_labels(demos: list[Example], n_classes: int, *, seed: int) -> list[Example]:
    """The demonstrations with every label mapped through
    :func:`permutation_without_fixed_label`: no demonstration keeps its label."""
    perm = permutation_without_fixed_label(n_classes, seed=seed)
    return [Example(dict(d.fields), int(perm[d.label])) for d in demos]


def other_task_for(task: Task, name: str | None) -> tuple[Task | None, str | None]:
    """The task of the other-task control and a note where there is none: ``name``
    (a paper task or a file), else a paper task's partner (:data:`PARTNERS`), another
    instance of the toy task, or nothing for a local file."""
    if name is not None:
        return load_task(name), None
    if task.name.startswith("toy-") and "held_out" in task.info:
        seed = int(task.info["seed"]) + 1
        return toy_task(seed, n_train=len(task.train), n_validation=1), None
    key = normalize_task_name(task.name)
    if task.source in ("hub", "staicc") and key in PARTNERS:
        source = "staicc" if task.source == "staicc" else "auto"
        return load_task(PARTNERS[key], source=source), None
    return None, (
        f"no other-task control: task {task.name!r} has no default partner (a local file); "
        "name one with other_task=... (--other-task)"
    )


@dataclass(frozen=True)
class ControlPrefix:
    """BOS + a control's demonstrations: what the control's queries follow."""

    prefix: Int[Tensor, " prefix"]
    demo_mask: Bool[Tensor, " prefix"]
    demos: list[Example]
    n_dropped: int


def control_prefix(
    adapter, plan: StudyPlan, demos: list[Example], spec: TaskSpec | None = None
) -> ControlPrefix:
    """The prefix of ``demos`` formatted by ``spec`` (default the task's), as many as fit
    the context next to the plan's longest query, as the plan fits its own."""
    tok = adapter.model.tokenizer
    spec = spec or plan.spec
    budget = query_token_budget(plan.spec, plan.validation, tok)
    fit = fit_to_context(demos, adapter.n_ctx, demonstration_token_counter(spec, tok), budget)
    if not fit.k_effective:
        raise ValueError("no demonstration of the control fits the context next to the queries")
    kept = list(fit.demonstrations)
    prompt = build_prompt(
        tok,
        [spec.format_demonstration(d) for d in kept],
        plan.spec.format_query(plan.validation[0]),
        separator=spec.separator,
        n_ctx=adapter.n_ctx,
    )
    n = prompt.query_start
    return ControlPrefix(prompt.prefix, prompt.demo_mask[:n], kept, fit.n_dropped)


def other_demonstrations(other: Task, plan: StudyPlan) -> list[Example]:
    """As many of ``other``'s demonstrations as the plan draws, with its seed."""
    s = plan.settings
    k = min(s.shots, len(other.train))
    return sample_demonstrations(other, k, seed=s.seed, balanced=s.balanced)


def random_updates(
    norms: Float[Tensor, "layer head"], d_head: int, *, seed: int, draws: int
) -> list[Float[Tensor, "layer head d_head d_head"]]:
    """Per draw, per head a Gaussian ``d_head x d_head`` matrix scaled to that head's
    Frobenius norm in ``norms`` (dW_ICL's), seeded."""
    out = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(int(seed) * 1009 + 21 * (draw + 1))
        r = torch.randn(*norms.shape, d_head, d_head, generator=g)
        scale = norms.float() / torch.linalg.matrix_norm(r)
        out.append(r * scale[..., None, None])
    return out
