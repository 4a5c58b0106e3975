"""Label-word restricted prediction: the candidate label word with the highest log-prob.

A prediction is made at the last prompt position, restricted to the task's label words
(method.md section 1). A class scores the log-probability of its label word; a label
word of several tokens scores the mean log-probability of its tokens (each conditioned
on the prompt and the word's earlier tokens). When every label word is one token (the
usual case) one forward per query is enough: the fast path reads the log-softmax at the
last position. Label words that share their first token are refused (they would tie on
the fast path and the model cannot tell them apart at the prediction position).

>>> import icl_lens as il
>>> from tests.models import make_model
>>> from icl_lens.data.tasks import TaskSpec
>>> model, _ = make_model("gpt2", n_layers=1)
>>> spec = TaskSpec("demo", "Sentence: {text} Label:", (" bad", " good"))
>>> prompts = [il.task_prompt(model.tokenizer, spec, [], q) for q in ("w1 w2", "w3")]
>>> pred = il.predict(model, prompts, spec)
>>> pred.scores.shape, pred.predicted.tolist() in ([0, 0], [0, 1], [1, 0], [1, 1])
(torch.Size([2, 2]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens.data.prompts import Prompt, check_prompts
from icl_lens.data.tasks import TaskSpec, check_label_words
from icl_lens.hooks.prefix import PrefixRunner
from icl_lens.model.adapter import adapt

__all__ = ["LabelTokens", "Predictions", "label_tokens", "predict"]


@dataclass(frozen=True)
class LabelTokens:
    """Token ids of each class's label word, as they follow the prompt.

    >>> lt = LabelTokens(((5,), (7, 8)))
    >>> lt.single_token, lt.first, lt.n_classes
    (False, (5, 7), 2)
    """

    ids: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        for word in self.ids:
            if not word or any(isinstance(i, bool) or not isinstance(i, Integral) for i in word):
                raise TypeError(f"each label word needs one or more int token ids, got {word!r}")
            if min(word) < 0:
                raise ValueError(f"label token ids must be >= 0, got {word!r}")

    def check(self, adapter) -> None:
        """Refuse ids outside ``adapter``'s vocabulary."""
        flat = torch.tensor([i for word in self.ids for i in word], dtype=torch.long)
        adapter.check_token_ids(flat, "the label words")

    @property
    def n_classes(self) -> int:
        return len(self.ids)

    @property
    def first(self) -> tuple[int, ...]:
        """The first token of every label word (the one-token fast path)."""
        return tuple(ids[0] for ids in self.ids)

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.ids)


def label_tokens(tokenizer, spec: TaskSpec, *, context: str | None = None) -> LabelTokens:
    """Token ids of ``spec``'s label words (multi-token words allowed).

    ``context`` (e.g. a formatted query) makes the ids those the word adds after that
    text, which matters for tokenizers that treat a string's start specially. Raises
    ``ValueError`` when two label words share their first token.

    >>> from tests.models import make_tokenizer
    >>> label_tokens(make_tokenizer(), TaskSpec("t", "{text} Label:", (" bad", " good")))
    LabelTokens(ids=((96,), (95,)))
    """
    ids = check_label_words(spec, tokenizer, require_single_token=False, context=context)
    return LabelTokens(tuple(tuple(int(i) for i in word) for word in ids))


@dataclass
class Predictions:
    """Class scores (mean label-word log-prob) of ``n`` queries and what they predict.

    ``gold`` is ``-1`` where a query has no label.
    """

    scores: Float[Tensor, "n n_class"]
    gold: Int[Tensor, " n"]

    @property
    def predicted(self) -> Int[Tensor, " n"]:
        """argmax over classes (the first class on exact ties)."""
        return self.scores.argmax(dim=-1)

    @property
    def correct(self) -> Tensor:
        """Bool per query: prediction == gold."""
        return self.predicted == self.gold

    @property
    def accuracy(self) -> float:
        labelled = self.gold >= 0
        if not labelled.any():
            return float("nan")
        return float(self.correct[labelled].float().mean())

    @property
    def gold_log_prob(self) -> float:
        """Mean over labelled queries of the gold class score."""
        labelled = self.gold >= 0
        if not labelled.any():
            return float("nan")
        rows = torch.arange(len(self.gold))[labelled]
        return float(self.scores[rows, self.gold[labelled]].mean())


def first_token_scores(
    last_logits: Float[Tensor, "batch d_vocab"], labels: LabelTokens
) -> Float[Tensor, "batch n_class"]:
    """Log-prob of every label word's first token at the prediction position."""
    log_probs = torch.log_softmax(last_logits.float(), dim=-1)
    return log_probs[:, list(labels.first)].cpu()


def complete_scores(
    runner: PrefixRunner,
    queries: Sequence[Int[Tensor, " query"]],
    labels: LabelTokens,
    first: Float[Tensor, "n n_class"],
    *,
    batch_size: int = 8,
) -> Float[Tensor, "n n_class"]:
    """Mean log-prob of multi-token label words, given their first-token log-probs.

    One extra forward per query and multi-token class: the query followed by the
    word's tokens but the last, scored at each of the word's positions.
    """
    scores = first.clone()
    for c, ids in enumerate(labels.ids):
        if len(ids) == 1:
            continue
        tail = torch.tensor(ids[:-1], dtype=torch.long)
        target = torch.tensor(ids[1:], dtype=torch.long)
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            out = runner.run([torch.cat([q.long(), tail]) for q in chunk])
            log_probs = torch.log_softmax(out.logits.float(), dim=-1).cpu()
            for b, q in enumerate(chunk):
                at = torch.arange(len(q), len(q) + len(tail))
                rest = log_probs[b, at, target]
                scores[start + b, c] = (first[start + b, c] + rest.sum()) / len(ids)
    return scores


def predict_queries(
    model,
    prefix: Int[Tensor, " prefix"],
    queries: Sequence[Int[Tensor, " query"]],
    labels: LabelTokens,
    *,
    gold: Sequence[int] | None = None,
    batch_size: int = 8,
) -> Predictions:
    """Predictions for ``prefix + query`` of each query (all sharing ``prefix``)."""
    adapter = adapt(model)
    labels.check(adapter)
    runner = PrefixRunner(adapter, prefix)
    parts = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        out = runner.run(chunk, logit_positions=[[len(q) - 1] for q in chunk])
        last = out.logits[:, 0]  # the prediction position only: no unembedding elsewhere
        parts.append(first_token_scores(last, labels))
    scores = torch.cat(parts) if parts else torch.zeros(0, labels.n_classes)
    if not labels.single_token:
        scores = complete_scores(runner, queries, labels, scores, batch_size=batch_size)
    gold_t = torch.full((len(queries),), -1) if gold is None else torch.tensor(list(gold))
    return Predictions(scores, gold_t.long())


def predict(
    model,
    prompts: Sequence[Prompt],
    spec: TaskSpec,
    *,
    batch_size: int = 8,
) -> Predictions:
    """Restricted prediction for each prompt (the paper's classification rule).

    Prompts that share their prefix (BOS + demonstrations) run together, reusing the
    prefix's key/value cache. ``gold`` comes from each prompt's ``label``.
    """
    if isinstance(prompts, Prompt):
        prompts = [prompts]
    if not prompts:
        raise ValueError("predict needs at least one prompt")
    adapter = adapt(model)
    check_prompts(prompts, getattr(adapter.model, "tokenizer", None))
    labels = label_tokens(adapter.model.tokenizer, spec)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p.prefix.tolist()), []).append(i)
    scores = torch.zeros(len(prompts), labels.n_classes)
    for prefix, members in groups.items():
        out = predict_queries(
            adapter,
            torch.tensor(prefix, dtype=torch.long),
            [prompts[i].query_tokens for i in members],
            labels,
            batch_size=batch_size,
        )
        scores[members] = out.scores
    gold = torch.tensor([-1 if p.label is None else p.label for p in prompts])
    return Predictions(scores, gold)
