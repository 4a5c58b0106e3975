"""Notebook shortcuts: the embedded toy model and a ready ICL prompt in one line each.

>>> import icl_lens as il
>>> model = il.toy_model()
>>> prompt = il.icl_prompt(model, task="toy", shots=4, seed=0)
>>> prompt.query_start > 0 and len(prompt.demo_spans) == 4
True
"""

from __future__ import annotations

from icl_lens.data.demonstrations import sample_demonstrations
from icl_lens.data.prompts import Prompt, task_prompt
from icl_lens.data.tasks import Example, Task
from icl_lens.model.adapter import adapt
from icl_lens.model.loading import LineChoice, load_model


def toy_model(*, line: LineChoice = "auto"):
    """The embedded toy model (a 3-layer word-level GPT-2 that learns in context),
    loaded offline as a hooked model."""
    from icl_lens.toy import toy_model_dir

    return load_model(toy_model_dir(), line=line)


def resolve_task(task: Task | str, *, seed: int = 0) -> Task:
    """A Task from a Task, ``"toy"`` (the held-out toy instance ``seed``), a paper task
    name or a local file."""
    if isinstance(task, Task):
        return task
    if task == "toy":
        from icl_lens.toy import toy_task

        return toy_task(seed)
    from icl_lens.data.task_sources import load_task

    return load_task(task)


def icl_prompt(
    model,
    task: Task | str = "toy",
    *,
    shots: int = 8,
    seed: int = 0,
    query: str | Example | None = None,
    balanced: bool = False,
) -> Prompt:
    """``shots`` demonstrations of ``task`` (drawn as the authors did, with ``seed``)
    followed by ``query`` (text, an Example, or by default the first validation example).

    >>> prompt = icl_prompt(toy_model(), "toy", shots=2, query="the film was great")
    >>> len(prompt.demo_spans)
    2
    """
    model = adapt(model).model  # a model or its adapter
    task = resolve_task(task, seed=seed)
    demos = sample_demonstrations(task, shots, seed=seed, balanced=balanced)
    if query is None:
        query = task.validation[0]
    return task_prompt(model.tokenizer, task.spec, demos, query, n_ctx=model.cfg.n_ctx)
