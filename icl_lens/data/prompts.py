"""Token sequences that remember which positions are demonstrations and which the query.

A prompt is ``BOS + demo_1 + sep + ... + demo_k + sep + query``; each piece is tokenized
on its own so the spans are exact. BOS belongs to the query side: it is what the model
sees zero-shot, so ``W_ZSL`` covers BOS and the query tokens.

>>> import icl_lens as il
>>> model = il.toy_model()                                              # doctest: +SKIP
>>> prompt = il.icl_prompt(model, task="toy", shots=4, query="w1 w2")  # doctest: +SKIP
>>> prompt.demo_spans, prompt.query_start                               # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from icl_lens.data.tasks import Example, TaskSpec


@dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt with its demonstration and query spans.

    ``tokenizer_id`` is the :func:`tokenizer_fingerprint` of the tokenizer that made the
    ids; analyses refuse a prompt whose tokenizer is not the model's
    (:func:`check_prompts`). ``None`` (a hand-made prompt) skips that check.
    """

    tokens: Int[Tensor, " pos"]
    demo_spans: tuple[tuple[int, int], ...]
    query_start: int
    str_tokens: tuple[str, ...] = ()
    label: int | None = None
    tokenizer_id: str | None = None
    separator_lengths: tuple[int, ...] | None = None
    """Per demonstration span, how many of its last tokens are the separator's (the
    demonstration's own tokens, tokenized alone, are the span's first tokens); None where
    a separator merges with the end of a demonstration under the tokenizer, so that the
    two cannot be told apart."""

    def __post_init__(self) -> None:
        _check_prompt(self)

    def content_spans(self) -> tuple[tuple[int, int], ...]:
        """The demonstration spans without their separators (the demonstration's own
        tokens: input and label). Raises ValueError where the separator cannot be cut off.

        >>> from tests.models import make_tokenizer
        >>> p = build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
        >>> p.demo_spans, p.content_spans()
        (((1, 4), (4, 7)), ((1, 3), (4, 6)))
        """
        if self.separator_lengths is None or len(self.separator_lengths) != len(self.demo_spans):
            raise ValueError(
                "this prompt does not say which of its demonstration tokens are separators "
                "(the separator merges with the demonstrations under this tokenizer, or the "
                "prompt was not built by build_prompt); use a separator that tokenizes on "
                "its own, e.g. a newline"
            )
        pairs = zip(self.demo_spans, self.separator_lengths, strict=True)
        return tuple((start, end - n) for (start, end), n in pairs)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def prediction_position(self) -> int:
        return self.n_tokens - 1

    @property
    def demo_mask(self) -> Bool[Tensor, " pos"]:
        """True at demonstration tokens (X'), False at BOS and query tokens (X)."""
        mask = torch.zeros(self.n_tokens, dtype=torch.bool)
        for start, end in self.demo_spans:
            mask[start:end] = True
        return mask

    @property
    def prefix(self) -> Int[Tensor, " prefix"]:
        """BOS and the demonstrations: the part every query of a run shares."""
        return self.tokens[: self.query_start]

    @property
    def query_tokens(self) -> Int[Tensor, " query"]:
        return self.tokens[self.query_start :]


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_prompt(prompt: Prompt) -> None:
    """Refuse a prompt whose parts contradict each other, where it is made: float or
    2-D token ids, a query of no tokens, demonstration spans outside the demonstrations
    or overlapping, token strings that do not match the ids. Each would otherwise give a
    wrong error deep inside an analysis, or a silently wrong split."""
    tokens = prompt.tokens
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"Prompt tokens must be a tensor of token ids, got {type(tokens).__name__}: "
            "pass torch.tensor(ids), or build the prompt with il.build_prompt / il.icl_prompt"
        )
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(
            f"Prompt tokens must be integer token ids, got a {tokens.dtype} tensor: "
            "token ids index the vocabulary; pass torch.tensor(ids, dtype=torch.long), or "
            "build the prompt with il.build_prompt / il.icl_prompt"
        )
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError(
            f"Prompt tokens must be one non-empty sequence (shape [pos]), got shape "
            f"{tuple(tokens.shape)}: one Prompt per prompt (a batch is a list of Prompts)"
        )
    n, start = tokens.numel(), prompt.query_start
    if not _is_int(start) or not 0 <= start < n:
        raise ValueError(
            f"Prompt query_start must be the position of the query's first token, an int "
            f"in 0..{n - 1} (the query needs at least one token), got {start!r}"
        )
    end_before = 0
    for span in prompt.demo_spans:
        ok = isinstance(span, tuple | list) and len(span) == 2 and all(map(_is_int, span))
        if not ok or not end_before <= span[0] <= span[1] <= start:
            raise ValueError(
                f"Prompt demo_spans must be (start, end) pairs in order, not overlapping, "
                f"before the query (query_start={start}); got {tuple(prompt.demo_spans)}"
            )
        end_before = span[1]
    if prompt.str_tokens and len(prompt.str_tokens) != n:
        raise ValueError(
            f"Prompt str_tokens has {len(prompt.str_tokens)} strings for {n} token ids: "
            "give one string per token (tokenizer.convert_ids_to_tokens(ids)), or none"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of ``tokenizer``'s vocabulary (token -> id): equal for two copies of
    one tokenizer, different for another model's. Computed once per tokenizer and
    vocabulary size, then cached on the tokenizer.

    >>> from tests.models import make_tokenizer
    >>> tokenizer_fingerprint(make_tokenizer()) == tokenizer_fingerprint(make_tokenizer())
    True
    """
    size = len(tokenizer)  # a few ms on a 262k vocabulary: call once per batch of prompts
    cached = getattr(tokenizer, "_icl_lens_fingerprint", None)
    if cached is not None and cached[0] == size:
        return cached[1]
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    text = "\n".join(f"{index}\t{token}" for token, index in pairs)
    fingerprint = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    try:
        tokenizer._icl_lens_fingerprint = (size, fingerprint)
    except AttributeError:  # pragma: no cover - a tokenizer that takes no attributes
        pass
    return fingerprint


def check_prompts(prompts: Sequence[Prompt], tokenizer) -> None:
    """Refuse anything but :class:`Prompt` objects, and prompts built with another
    tokenizer than ``tokenizer`` (the model's): their ids would index the wrong tokens,
    silently. The tokenizer is fingerprinted once for all the prompts.

    >>> check_prompts(["w1 w2"], None)
    Traceback (most recent call last):
    ...
    TypeError: the prompt must be a Prompt (il.icl_prompt, il.task_prompt), got str
    """

    def name(i: int) -> str:
        return "the prompt" if len(prompts) == 1 else f"prompt {i}"

    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(
                f"{name(i)} must be a Prompt (il.icl_prompt, il.task_prompt), "
                f"got {type(prompt).__name__}"
            )
    made_with = [(i, p.tokenizer_id) for i, p in enumerate(prompts) if p.tokenizer_id]
    if not made_with or tokenizer is None:
        return
    own = tokenizer_fingerprint(tokenizer)
    foreign = [i for i, fingerprint in made_with if fingerprint != own]
    if foreign:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"{name(foreign[0])} was built with another tokenizer than this model's "
            f"({tokenizer_name!r}); build it with the model's own: "
            "il.task_prompt(model.tokenizer, ...) or il.icl_prompt(model, ...)"
        )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, no special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_id(tokenizer) -> int:
    token = tokenizer.bos_token_id
    if token is None:
        token = tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start prompts with")
    return int(token)


def build_prompt(
    tokenizer,
    demonstrations: Sequence[str],
    query: str,
    *,
    separator: str = "\n",
    label: int | None = None,
    n_ctx: int | None = None,
) -> Prompt:
    """Assemble ``BOS + (demo + separator)* + query`` from already formatted texts.

    >>> from tests.models import make_tokenizer
    >>> p = build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> p.demo_spans, p.query_start, p.n_tokens
    (((1, 4), (4, 7)), 7, 8)
    """
    if isinstance(demonstrations, str):
        raise TypeError(
            "demonstrations must be a list of formatted texts, one per demonstration; got "
            "a single str (its characters would become demonstrations): wrap it, [text]"
        )
    demonstrations = list(demonstrations)
    odd = next((d for d in demonstrations if not isinstance(d, str)), None)
    if odd is not None:
        raise TypeError(f"each demonstration must be a formatted text (a str), got {odd!r}")
    if not isinstance(query, str):
        raise TypeError(f"query must be the query's formatted text (a str), got {query!r}")
    ids = [bos_id(tokenizer)]
    spans, sep_lengths = [], []
    for demo in demonstrations:
        start = len(ids)
        piece, alone = encode(tokenizer, demo + separator), encode(tokenizer, demo)
        ids += piece
        spans.append((start, len(ids)))
        separable = piece[: len(alone)] == alone
        sep_lengths.append(len(piece) - len(alone) if separable else None)
    query_start = len(ids)
    query_ids = encode(tokenizer, query)
    if not query_ids:
        raise ValueError(f"the query {query!r} tokenizes to nothing")
    ids += query_ids
    if n_ctx is not None and len(ids) > n_ctx:
        raise ValueError(
            f"the prompt has {len(ids)} tokens ({query_start} of BOS and demonstrations, "
            f"{len(query_ids)} of query) but the model's context is {n_ctx}: "
            "use fewer or shorter demonstrations"
        )
    return Prompt(
        tokens=torch.tensor(ids, dtype=torch.long),
        demo_spans=tuple(spans),
        query_start=query_start,
        str_tokens=tuple(tokenizer.convert_ids_to_tokens(ids)),
        label=label,
        tokenizer_id=tokenizer_fingerprint(tokenizer),
        separator_lengths=None if None in sep_lengths else tuple(sep_lengths),
    )


def task_prompt(
    tokenizer,
    spec: TaskSpec,
    demonstrations: Sequence[Example],
    query: Example | str,
    *,
    n_ctx: int | None = None,
) -> Prompt:
    """A prompt for ``query`` with ``demonstrations`` formatted by ``spec``."""
    demonstrations = [demonstrations] if isinstance(demonstrations, str) else list(demonstrations)
    odd = next((d for d in demonstrations if not isinstance(d, Example)), None)
    if odd is not None:
        raise TypeError(
            "demonstrations must be a list of Examples (sample_demonstrations(task, k, "
            f"seed=...)), got {odd!r}"
        )
    if not isinstance(query, Example | str):
        raise TypeError(f"query must be an Example or the query's text (a str), got {query!r}")
    if isinstance(query, str):
        query = Example({"text": query}, label=-1)
    return build_prompt(
        tokenizer,
        [spec.format_demonstration(d) for d in demonstrations],
        spec.format_query(query),
        separator=spec.separator,
        label=None if query.label < 0 else query.label,
        n_ctx=n_ctx,
    )
