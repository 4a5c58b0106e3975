"""Classification tasks: a template, one label word per class, and examples.

>>> spec = TaskSpec("sst2", "Sentence: {text} Label:", (" Negative", " Positive"))
>>> ex = Example({"text": "a gripping film"}, label=1)
>>> spec.format_query(ex)
'Sentence: a gripping film Label:'
>>> spec.format_demonstration(ex)
'Sentence: a gripping film Label: Positive'
>>> PAPER_TASKS["cb"].label_words
(' True', ' False', ' Neither')
>>> paper_task_spec("AG News").name
'agnews'

Loading data lives in :mod:`icl_lens.data.task_sources` (``load_task``, ``task_from_records``),
sampling demonstrations in :mod:`icl_lens.data.demonstrations`.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TEMPLATE",
    "PAPER_TASKS",
    "Example",
    "Task",
    "TaskSpec",
    "check_label_words",
    "normalize_task_name",
    "paper_task_spec",
]


@dataclass(frozen=True)
class Example:
    """One labelled example; ``fields`` fill the template's ``{placeholders}``."""

    fields: dict[str, str]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    """How a task turns examples into text.

    ``label_words[c]`` is the text that follows the template for class ``c`` (with its
    leading space, as it appears in the prompt). ``separator`` joins demonstrations.

    >>> spec = TaskSpec("subj", "Input: {text} Type:", [" objective", " subjective"])
    >>> spec.label_words, spec.template_fields, spec.label_names
    ((' objective', ' subjective'), ('text',), ('objective', 'subjective'))
    >>> spec.label_index("Subjective"), spec.label_index(0)
    (1, 0)
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    separator: str = "\n"

    def __post_init__(self) -> None:
        words = tuple(self.label_words)
        object.__setattr__(self, "label_words", words)
        if len(words) < 2:
            raise ValueError(
                f"task {self.name!r}: a classification task needs at least two label words, "
                f"got {words!r}"
            )
        if not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"task {self.name!r}: every label word must be non-empty text")
        dupes = [w for w, n in Counter(words).items() if n > 1]
        if dupes:
            raise ValueError(f"task {self.name!r}: label words repeat: {dupes!r}")
        try:
            fields = _template_fields(self.template)
        except ValueError as err:
            raise ValueError(f"task {self.name!r}: bad template {self.template!r}: {err}") from err
        if not fields:
            raise ValueError(
                f"task {self.name!r}: template {self.template!r} has no {{placeholder}} for "
                "the example text, e.g. 'Input: {text} Label:'"
            )

    def format_query(self, example: Example) -> str:
        try:
            return self.template.format(**example.fields)
        except KeyError as err:
            raise KeyError(
                f"task {self.name!r}: template needs field {err.args[0]!r}, the example has "
                f"{sorted(example.fields)}"
            ) from None

    def format_demonstration(self, example: Example) -> str:
        return self.format_query(example) + self.label_words[example.label]

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def template_fields(self) -> tuple[str, ...]:
        """The ``{placeholders}`` of the template, in order of first appearance."""
        return _template_fields(self.template)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Label words without surrounding whitespace (for tables and error messages)."""
        return tuple(w.strip() for w in self.label_words)

    def label_index(self, label: int | str) -> int:
        """Class index of ``label``: an index, or a label word (exact, stripped, any case)."""
        if isinstance(label, bool):
            raise ValueError(f"task {self.name!r}: label {label!r} is a bool, not a class")
        if isinstance(label, int):
            if not 0 <= label < self.n_classes:
                raise ValueError(
                    f"task {self.name!r}: label {label} out of range; classes are "
                    f"0..{self.n_classes - 1} ({', '.join(self.label_names)})"
                )
            return label
        if isinstance(label, str):
            if label in self.label_words:
                return self.label_words.index(label)
            stripped = label.strip()
            if stripped in self.label_names:
                return self.label_names.index(stripped)
            folded = [n.casefold() for n in self.label_names]
            if folded.count(stripped.casefold()) == 1:
                return folded.index(stripped.casefold())
            raise ValueError(
                f"task {self.name!r}: label {label!r} is not one of the label words "
                f"{list(self.label_names)}"
            )
        raise TypeError(f"task {self.name!r}: label must be int or str, got {type(label)}")


@dataclass(repr=False)
class Task:
    """A task spec with its train (demonstration pool) and validation examples.

    ``info`` records where the examples came from (source, path or hub id, split sizes
    before capping, the validation shuffle seed and limit).
    """

    spec: TaskSpec
    train: list[Example]
    validation: list[Example]
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        """Where the examples came from: ``"hub"``, ``"file"``, ``"records"``, ... (see
        ``info`` for the details)."""
        return str(self.info.get("source", "unknown"))

    def label_counts(self, split: str = "train") -> dict[int, int]:
        """Examples per class index in ``split`` ("train" or "validation"), all classes listed."""
        examples = {"train": self.train, "validation": self.validation}[split]
        counts = Counter(ex.label for ex in examples)
        return {c: counts.get(c, 0) for c in range(self.spec.n_classes)}

    def __repr__(self) -> str:
        src = self.info.get("source", "?")
        return (
            f"Task({self.spec.name!r}, {self.spec.n_classes} classes "
            f"{list(self.spec.label_names)}, train={len(self.train)}, "
            f"validation={len(self.validation)}, source={src!r})"
        )


def _template_fields(template: str) -> tuple[str, ...]:
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise ValueError(f"placeholder {{{name}}} must be a name like {{text}}")
        if name not in names:
            names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------------------
# The paper's six tasks (method.md section 5; templates and label words of the authors'
# code, microsoft/LMOps understand_icl). Single-text tasks use the field ``text``.
# --------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = "Input: {text} Label:"
"""Template for a local file with no spec of its own and no paper-task name."""

PAPER_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "Sentence: {text} Label:", (" Negative", " Positive")),
        TaskSpec(
            "sst5",
            "Sentence: {text} Label:",
            (" terrible", " bad", " neutral", " good", " great"),
        ),
        TaskSpec("mr", "Review: {text} Sentiment:", (" Negative", " Positive")),
        TaskSpec("subj", "Input: {text} Type:", (" objective", " subjective")),
        TaskSpec(
            "agnews",
            "Classify the news articles into the categories of World, Sports, Business, "
            "and Technology. Article: {text} Answer:",
            (" World", " Sports", " Business", " Technology"),
        ),
        TaskSpec(
            "cb",
            "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
            (" True", " False", " Neither"),
        ),
    )
}
"""The paper's six tasks by canonical name: sst2, sst5, mr, subj, agnews, cb.

The separator is this package's default ``"\n"``. The authors' code joins demonstrations
with no text at all but ends each one with the dictionary's end-of-sentence token (for
GPT-2 tokenizers the analogue is ``"<|endoftext|>"``); ``dataclasses.replace(spec,
separator=...)`` reproduces that where the tokenizer maps the text to its special token.
"""

_ALIASES = {"rottentomatoes": "mr", "moviereview": "mr", "moviereviews": "mr"}


def normalize_task_name(name: str) -> str:
    """Lower-case, drop separators and map aliases: "SST-2" -> "sst2", "ag_news" -> "agnews"."""
    key = re.sub(r"[\s_\-./]+", "", name.lower())
    return _ALIASES.get(key, key)


def paper_task_spec(name: str) -> TaskSpec:
    """The registry spec of a paper task, by any spelling ("SST-2", "ag_news", "CB")."""
    key = normalize_task_name(name)
    if key not in PAPER_TASKS:
        raise KeyError(f"{name!r} is not a paper task; known: {', '.join(PAPER_TASKS)}")
    return PAPER_TASKS[key]


# --------------------------------------------------------------------------------------
# Label-word validation
# --------------------------------------------------------------------------------------


def _as_tokenizer(tokenizer: Any) -> Any:
    """Accept an HF tokenizer, or a model that carries one (TransformerLens ``.tokenizer``)."""
    if not hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(
            "need a Hugging Face tokenizer (or a model with a .tokenizer), got "
            f"{type(tokenizer).__name__}"
        )
    return tokenizer


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return [int(i) for i in ids]


def _show(tokenizer: Any, ids: list[int]) -> str:
    try:
        toks = tokenizer.convert_ids_to_tokens(ids)
    except Exception:  # noqa: BLE001 - display only
        toks = ids
    return "[" + ", ".join(f"{t!r}={i}" for t, i in zip(toks, ids, strict=True)) + "]"


def _warn_bare_space(spec: TaskSpec, tokenizer: Any, per_class: list[list[int]]) -> None:
    """Warn about label words whose first token is a bare space: the one-token path
    scores the space, and the word itself only through later tokens."""
    bare = []
    for word, ids in zip(spec.label_words, per_class, strict=True):
        try:
            text = tokenizer.decode(ids[:1])
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode: nothing to say
            continue
        if not text.strip():
            bare.append(f"{word!r} -> {_show(tokenizer, ids)}")
    if bare:
        warnings.warn(
            f"task {spec.name!r}: label words start with a bare space token: "
            f"{'; '.join(bare)}. Their first token says nothing about the class; choose words "
            "that are one token with their leading space, or drop the space",
            stacklevel=3,
        )


def check_label_words(
    spec: TaskSpec,
    tokenizer: Any,
    *,
    require_single_token: bool = True,
    context: str | None = None,
) -> list[list[int]]:
    """Token ids of every label word, checked for the one-token scoring path.

    Each word is tokenized as ``tokenizer(word, add_special_tokens=False)``; with
    ``context`` (e.g. a formatted query) the ids are those that the word adds after that
    text instead, which matters for tokenizers that treat the start of a string specially
    (SentencePiece). Raises ``ValueError`` naming the word and its tokens when a word is
    several tokens and ``require_single_token``, and naming both words when two label
    words start with the same token (their first-token scores would be identical), and
    naming a word that is the tokenizer's unknown token; warns about words whose first
    token is a bare space.
    Returns the per-class token id lists (for the multi-token mean log-prob path).
    ``tokenizer`` may also be a model with a ``.tokenizer`` (a TransformerLens model).

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> gpt2 = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
    >>> ids = check_label_words(PAPER_TASKS["sst2"], gpt2)  # doctest: +SKIP
    >>> [len(i) for i in ids]  # one token per class  # doctest: +SKIP
    [1, 1]
    """
    tok = _as_tokenizer(tokenizer)
    per_class: list[list[int]] = []
    for word in spec.label_words:
        if context is None:
            ids = _encode(tok, word)
        else:
            prefix = _encode(tok, context)
            full = _encode(tok, context + word)
            if full[: len(prefix)] != prefix:
                raise ValueError(
                    f"task {spec.name!r}: label word {word!r} merges with the text before it "
                    f"(context ...{context[-20:]!r} tokenizes differently once the word "
                    "follows); give the label word a leading space or change the template"
                )
            ids = full[len(prefix) :]
        if not ids:
            raise ValueError(f"task {spec.name!r}: label word {word!r} tokenizes to nothing")
        unknown = getattr(tok, "unk_token_id", None)
        if unknown is not None and unknown in ids:
            raise ValueError(
                f"task {spec.name!r}: label word {word!r} is not in the tokenizer's vocabulary "
                f"(it tokenizes to {_show(tok, ids)}, the unknown token); choose another word"
            )
        per_class.append(ids)
    _warn_bare_space(spec, tok, per_class)

    if require_single_token:
        multi = [
            (w, ids) for w, ids in zip(spec.label_words, per_class, strict=True) if len(ids) > 1
        ]
        if multi:
            detail = "; ".join(f"{w!r} -> {_show(tok, ids)}" for w, ids in multi)
            raise ValueError(
                f"task {spec.name!r}: label words must be single tokens for this tokenizer, "
                f"but {detail}. Choose single-token label words (often with a leading space), "
                "or allow multi-token words (scored by mean log-prob of their tokens)"
            )

    first: dict[int, str] = {}
    for word, ids in zip(spec.label_words, per_class, strict=True):
        if ids[0] in first:
            other = first[ids[0]]
            raise ValueError(
                f"task {spec.name!r}: label words {other!r} and {word!r} share their first "
                f"token {_show(tok, ids[:1])}; the model cannot tell them apart at the "
                "prediction position. Use label words that start differently"
            )
        first[ids[0]] = word
    return per_class
