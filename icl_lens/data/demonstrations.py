"""Drawing demonstrations from a task's train split, and fitting them into a context.

The authors' code draws demonstrations by shuffling the train split with the run's seed
(``datasets.Dataset.shuffle(seed=seed)``) and taking the first k. That shuffle is
``numpy.random.default_rng(seed).permutation(len(train))``, which
:func:`sample_demonstrations` uses, so on the same train split the same seed gives the
same demonstrations in the same order. When the context is full the authors keep the
longest prefix that fits (CB 19, AGNews 22 of 32 with 2048 tokens): :func:`fit_to_context`.

>>> from icl_lens.data.task_sources import task_from_records
>>> recs = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
>>> task = task_from_records(recs, recs[:2], label_words=[" no", " yes"])
>>> [ex.fields["text"] for ex in sample_demonstrations(task, 3, seed=1)]
['t8', 't4', 't7']
>>> fit = fit_to_context(task.train[:4], n_ctx=10, count_tokens=lambda ex: 3, query_budget=4)
>>> fit.k_requested, fit.k_effective, fit.n_tokens
(4, 2, 10)
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from icl_lens.data.tasks import Example, Task, TaskSpec, _as_tokenizer, _encode

__all__ = [
    "ContextFit",
    "demonstration_token_counter",
    "fit_to_context",
    "query_token_budget",
    "sample_demonstrations",
    "shuffled_indices",
]

log = logging.getLogger(__name__)


def shuffled_indices(n: int, seed: int) -> np.ndarray:
    """The authors' shuffle: ``np.random.default_rng(seed).permutation(n)``.

    Identical to the order of ``datasets.Dataset.shuffle(seed=seed)`` on ``n`` rows.
    """
    return np.random.default_rng(seed).permutation(n)


def _class_desc(spec: TaskSpec, c: int) -> str:
    word = spec.label_words[c] if 0 <= c < spec.n_classes else "?"
    return f"{word!r} (label {c})"


def sample_demonstrations(
    task: Task, k: int, *, seed: int, balanced: bool = False
) -> list[Example]:
    """``k`` demonstrations from ``task.train``: shuffle with ``seed``, take the first k.

    The shuffle is :func:`shuffled_indices` (numpy ``default_rng(seed).permutation``, the
    same as the authors' ``Dataset.shuffle(seed=seed)``). With ``balanced=True`` the
    classes take turns (round-robin, in the order in which they first appear in the
    shuffled split), each contributing its next example in shuffled order, so class
    counts differ by at most one; the chosen examples are returned in their shuffled
    order (no artificial A, B, A, B label pattern). A class that runs out, or is absent
    from the train split, leaves the set unbalanced with a warning.

    ``k=0`` returns ``[]`` (zero-shot). Raises ``ValueError`` for a negative k, an empty
    train split, a train split with a single class, or ``k`` above the train size.

    >>> from icl_lens.data.task_sources import task_from_records
    >>> recs = [{"text": str(i), "label": int(i < 8)} for i in range(10)]  # 8 vs 2
    >>> task = task_from_records(recs, recs[:1], label_words=[" a", " b"])
    >>> [ex.label for ex in sample_demonstrations(task, 4, seed=0, balanced=True)]
    [1, 1, 0, 0]
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"k must be an int, got {k!r}")
    k = int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return []
    train = task.train
    name = task.spec.name
    n = len(train)
    if n == 0:
        raise ValueError(
            f"task {name!r} has no train examples; demonstrations are drawn from the train "
            "split (check the file's split column, or pass train records)"
        )
    counts = Counter(ex.label for ex in train)
    if len(counts) == 1:
        (only,) = counts
        raise ValueError(
            f"the train split of task {name!r} has a single class, "
            f"{_class_desc(task.spec, only)}, in all {n} examples; demonstrations (and the "
            "finetuning baseline) need at least two classes. Check the label column and "
            "the label words"
        )
    if k > n:
        raise ValueError(
            f"k={k} demonstrations requested but the train split of task {name!r} has only "
            f"{n} examples; use k <= {n} (e.g. --shots {n}) or add train examples"
        )
    order = shuffled_indices(n, seed)
    if not balanced:
        return [train[i] for i in order[:k]]

    queues: dict[int, deque[int]] = {}
    for i in order:
        queues.setdefault(train[i].label, deque()).append(int(i))
    cycle = list(queues)  # classes by first appearance in the shuffled split
    picked: list[int] = []
    while len(picked) < k:
        for c in cycle:
            if len(picked) == k:
                break
            if queues[c]:
                picked.append(queues[c].popleft())
    position = {int(i): p for p, i in enumerate(order)}
    picked.sort(key=position.__getitem__)
    got = Counter(train[i].label for i in picked)
    share = k // task.spec.n_classes
    short = [c for c in range(task.spec.n_classes) if got.get(c, 0) < share]
    if short:
        warnings.warn(
            f"task {name!r}: balanced sampling of k={k} could not give every class "
            f"{share} examples; "
            + ", ".join(
                f"{_class_desc(task.spec, c)} has {counts.get(c, 0)} in the train split"
                for c in short
            ),
            stacklevel=2,
        )
    return [train[i] for i in picked]


@dataclass(frozen=True)
class ContextFit:
    """The demonstrations that fit, and what it cost.

    ``k_effective`` (= ``len(demonstrations)``) is the k to report when it is smaller than
    ``k_requested`` (the paper: CB 19, AGNews 22 instead of 32).
    """

    demonstrations: list[Example]
    k_requested: int
    n_ctx: int
    query_budget: int
    demo_tokens: tuple[int, ...]
    skipped: tuple[tuple[int, int], ...] = ()
    """(position in the drawn order, tokens) of each demonstration too long to fit the
    context even alone next to the query budget; they are skipped, not packed."""

    @property
    def k_effective(self) -> int:
        return len(self.demonstrations)

    @property
    def n_dropped(self) -> int:
        return self.k_requested - self.k_effective

    @property
    def n_tokens(self) -> int:
        """Tokens used by the kept demonstrations plus the query budget."""
        return sum(self.demo_tokens) + self.query_budget


def fit_to_context(
    demos: Sequence[Example],
    n_ctx: int,
    count_tokens: Callable[[Example], int],
    query_budget: int,
) -> ContextFit:
    """Keep the longest prefix of ``demos`` whose tokens plus ``query_budget`` fit ``n_ctx``.

    ``count_tokens(example)`` is the number of tokens one demonstration takes in the prompt
    (its separator included; :func:`demonstration_token_counter` builds one from a
    tokenizer). ``query_budget`` is what the rest of the prompt needs: BOS, the longest
    query and, if scored by appending, the longest label word (:func:`query_token_budget`).
    Demonstrations are dropped from the end, as the authors' code does.

    One exception, where the authors' rule would give up: a demonstration that cannot
    fit even alone (its tokens + ``query_budget`` > ``n_ctx``) is skipped with a warning
    naming it, and packing goes on with the next one (:attr:`ContextFit.skipped`). With
    the paper's tasks and contexts no demonstration is that long, so the rule there is
    unchanged; elsewhere one over-long text no longer empties the prompt.

    >>> fit = fit_to_context([Example({"text": "x"}, 0)] * 5, 100, lambda ex: 30, 20)
    >>> fit.k_effective, fit.n_dropped
    (2, 3)
    """
    if query_budget < 0:
        raise ValueError(f"query_budget must be >= 0, got {query_budget}")
    if query_budget > n_ctx:
        raise ValueError(
            f"the query alone needs {query_budget} tokens but the context holds {n_ctx}; "
            "shorten the queries or use a model with a longer context"
        )
    kept: list[Example] = []
    sizes: list[int] = []
    skipped: list[tuple[int, int]] = []
    used = query_budget
    for position, ex in enumerate(demos):
        size = int(count_tokens(ex))
        if size < 0:
            raise ValueError(f"count_tokens returned {size} for {ex!r}")
        if query_budget + size > n_ctx:
            skipped.append((position, size))
            continue
        if used + size > n_ctx:
            break
        kept.append(ex)
        sizes.append(size)
        used += size
    if skipped:
        warnings.warn(
            "skipped demonstrations too long for the context even alone: "
            + ", ".join(f"demonstration {i + 1} has {n} tokens" for i, n in skipped)
            + f"; the context holds {n_ctx} tokens and the longest query needs {query_budget}",
            stacklevel=2,
        )
    if len(kept) < len(demos):
        log.info(
            "context of %d tokens holds %d of %d demonstrations (query budget %d)",
            n_ctx,
            len(kept),
            len(demos),
            query_budget,
        )
    return ContextFit(kept, len(demos), n_ctx, query_budget, tuple(sizes), tuple(skipped))


def demonstration_token_counter(spec: TaskSpec, tokenizer: Any) -> Callable[[Example], int]:
    """A ``count_tokens`` for :func:`fit_to_context`: tokens of demonstration + separator.

    Counted as ``tokenizer(spec.format_demonstration(ex) + spec.separator,
    add_special_tokens=False)``; tokenizing pieces apart can differ by a token from the
    assembled prompt at the joins, so keep a small margin in ``n_ctx`` when it is tight.
    """
    tok = _as_tokenizer(tokenizer)

    def count(ex: Example) -> int:
        return len(_encode(tok, spec.format_demonstration(ex) + spec.separator))

    return count


def query_token_budget(
    spec: TaskSpec,
    queries: Iterable[Example],
    tokenizer: Any,
    *,
    add_bos: bool = True,
    include_label: bool = True,
) -> int:
    """Tokens the longest query needs: BOS + query (+ the longest label word).

    The authors reserve the longest validation query with its label (their
    ``max_valid_len``) before packing demonstrations.
    """
    tok = _as_tokenizer(tokenizer)
    longest = max((len(_encode(tok, spec.format_query(q))) for q in queries), default=0)
    label = max(len(_encode(tok, w)) for w in spec.label_words) if include_label else 0
    return longest + label + int(add_bos)
