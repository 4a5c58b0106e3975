"""A seedable synthetic sentiment task family for the embedded toy model.

Every sentence is 4-7 words over a fixed vocabulary: 2-4 *class words*, all positive or
all negative, among neutral fillers, the last word always a class word. The class is the
valence of the class words; the model learns that rule in its weights during training.

What the weights cannot know is the label word of each class: every task *instance*
(one seed) draws its own pair of label words.

- ``canonical`` instances use one of a few canonical pairs in a fixed orientation
  (``" bad"``/``" good"``, ``" negative"``/``" positive"``, ...): a trained model can
  answer them zero-shot.
- ``arbitrary`` instances use two words from a pool of unrelated words (colours,
  animals, ...) in a random orientation: only the demonstrations tell which word means
  which class, so zero-shot accuracy is at chance and in-context learning must do the
  work.

Seeds: instance seeds ``>= TRAIN_SEED_BASE`` (10**6) are reserved for training the toy
model; any seed below that is a held-out instance. ``toy_task`` refuses nothing, but the
evaluation and the demo use seeds ``< 10**6`` only.

Splits are class-balanced in every even-length prefix (labels come in shuffled pairs),
so the first ``k`` demonstrations of ``train`` are balanced for any even ``k``. The
instance (label pair, orientation), the train split and the validation split use
independent random streams: changing ``n_train`` does not change ``validation``.
"""

from __future__ import annotations

import random

from icl_lens.data.tasks import Example, Task, TaskSpec

TRAIN_SEED_BASE = 10**6
"""Instance seeds at or above this value are used to train the toy model."""

CANONICAL_SHARE = 0.3
"""Share of instances (for ``kind=None``) that use a canonical label pair."""

TEMPLATE = "Sentence: {text} Label:"
SEPARATOR = "\n"

POSITIVE_WORDS = (
    "great wonderful excellent superb lovely brilliant delightful charming moving gripping "
    "tender funny clever beautiful stunning fresh warm vivid elegant joyful "
    "smart rich bold graceful inspiring touching thrilling witty pleasant solid "
    "fine masterful heartfelt magical sharp sweet strong lively genuine memorable"
).split()

NEGATIVE_WORDS = (
    "awful terrible boring dull bland clumsy tedious messy weak stale "
    "lifeless annoying silly ugly painful shallow flat tiresome dreary poor "
    "lame forced hollow sloppy cheap pointless awkward grim sour muddled "
    "bloated listless tepid dismal inept trite crude empty slow bleak"
).split()

NEUTRAL_WORDS = (
    "the a an film movie story plot actor scene script "
    "music camera director cast ending hour score with and of "
    "its this that is was very quite rather really in "
    "on about for by as it some every drama comedy "
    "character dialogue sequence picture show role moment tone pace style "
    "effort work premise visuals sound production screenplay performance world night"
).split()

# (class 0 word, class 1 word): class 0 is negative, class 1 is positive.
CANONICAL_PAIRS = (("bad", "good"), ("negative", "positive"), ("no", "yes"), ("sad", "happy"))

ARBITRARY_WORDS = (
    "red blue green yellow orange purple black white "
    "cat dog fox owl bear wolf fish bird "
    "apple pear plum lime north south east west"
).split()

KINDS = ("canonical", "arbitrary")


def vocabulary() -> list[str]:
    """Every word the toy tokenizer knows (special tokens excluded), in a fixed order."""
    words = ["\n", "Sentence:", "Label:"]
    words += POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS
    words += [w for pair in CANONICAL_PAIRS for w in pair] + ARBITRARY_WORDS
    return words


def _check_vocabulary() -> None:
    words = vocabulary()
    assert len(words) == len(set(words)), "toy vocabulary has duplicates"
    assert len(POSITIVE_WORDS) == len(NEGATIVE_WORDS) == 40
    assert len(NEUTRAL_WORDS) == 60


_check_vocabulary()


def _sentence(rng: random.Random, label: int) -> str:
    n_words = rng.randint(4, 7)
    n_class = rng.randint(2, 4)
    own = POSITIVE_WORDS if label == 1 else NEGATIVE_WORDS
    words = [rng.choice(own) for _ in range(n_class - 1)]
    words += [rng.choice(NEUTRAL_WORDS) for _ in range(n_words - n_class)]
    rng.shuffle(words)
    # The last word is always a class word: the valence sits right before "Label:".
    return " ".join([*words, rng.choice(own)])


def _balanced_labels(rng: random.Random, n: int) -> list[int]:
    labels: list[int] = []
    while len(labels) < n:
        pair = [0, 1]
        rng.shuffle(pair)
        labels += pair
    return labels[:n]


def _examples(rng: random.Random, n: int) -> list[Example]:
    return [Example({"text": _sentence(rng, y)}, y) for y in _balanced_labels(rng, n)]


def toy_task(
    seed: int,
    *,
    n_train: int = 32,
    n_validation: int = 32,
    kind: str | None = None,
    canonical_share: float = CANONICAL_SHARE,
) -> Task:
    """One instance of the toy task family, deterministic in ``seed``.

    ``kind`` is ``"canonical"``, ``"arbitrary"`` or ``None`` (drawn from the seed, with
    probability ``canonical_share`` of canonical; the default is the share the packaged
    model was trained with). Seeds ``>= TRAIN_SEED_BASE`` are the
    training instances of the toy model; use smaller seeds for held-out evaluation.
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be None or one of {KINDS}, got {kind!r}")
    meta = random.Random(f"toy-instance-{seed}")
    drawn = "canonical" if meta.random() < canonical_share else "arbitrary"
    kind = kind or drawn
    if kind == "canonical":
        pair = CANONICAL_PAIRS[meta.randrange(len(CANONICAL_PAIRS))]
    else:
        pair = tuple(meta.sample(ARBITRARY_WORDS, 2))
    label_words = tuple(" " + w for w in pair)
    spec = TaskSpec(
        name=f"toy-{seed}", template=TEMPLATE, label_words=label_words, separator=SEPARATOR
    )
    train = _examples(random.Random(f"toy-train-{seed}"), n_train)
    validation = _examples(random.Random(f"toy-validation-{seed}"), n_validation)
    info = {
        "seed": seed,
        "kind": kind,
        "classes": ("negative", "positive"),
        "held_out": seed < TRAIN_SEED_BASE,
    }
    return Task(spec=spec, train=train, validation=validation, info=info)
