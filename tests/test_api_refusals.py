"""The Python API refuses wrong arguments early and clearly (issue 14): prompts made with
another tokenizer, token ids outside the vocabulary, and malformed decompose arguments."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import icl_lens as il
from icl_lens.data.prompts import tokenizer_fingerprint
from icl_lens.data.task_sources import task_from_records
from icl_lens.study.predict import LabelTokens, label_tokens
from icl_lens.study.records import record
from tests.models import SPECIALS, VOCAB_SIZE, WORDS, make_model, make_tokenizer

SPEC = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"))


def shuffled_tokenizer() -> PreTrainedTokenizerFast:
    """Same size and special tokens as the test tokenizer, but the words in another order:
    every id is in range, and most mean another word."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS[::-1])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<bos>"
    )


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2", n_layers=1)[0]


def prompt_of(model):
    return il.build_prompt(model.tokenizer, ["Sentence: w1 Label: good"], "Sentence: w2")


@pytest.fixture(scope="module")
def prompt():
    return il.build_prompt(make_tokenizer(), ["Sentence: w1 Label: good"], "Sentence: w2 Label:")


def test_the_fingerprint_tells_tokenizers_apart_and_is_cached():
    a, b = make_tokenizer(), shuffled_tokenizer()
    assert len(a) == len(b) == VOCAB_SIZE
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(make_tokenizer())
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    a.add_tokens(["new-word"])  # a changed vocabulary is hashed again, not served stale
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(make_tokenizer())


def test_a_prompt_from_another_tokenizer_is_refused(model):
    foreign = il.build_prompt(shuffled_tokenizer(), ["Sentence: w1 Label: good"], "Sentence: w2")
    assert foreign.tokens.max() < VOCAB_SIZE  # in range: only the fingerprint catches it
    with pytest.raises(ValueError, match="another tokenizer than this model's"):
        il.decompose(model, foreign)
    with pytest.raises(ValueError, match="prompt 1 was built with another tokenizer"):
        il.predict(model, [prompt_of(model), foreign], SPEC)
    with pytest.raises(ValueError, match="the prompt was built with another tokenizer"):
        il.predict(model, [foreign], SPEC)


def test_token_ids_outside_the_vocabulary_are_refused(model, prompt):
    handmade = dataclasses.replace(prompt, tokens=prompt.tokens + 1000, tokenizer_id=None)
    with pytest.raises(
        ValueError, match=f"token id .* outside this model's vocabulary of {VOCAB_SIZE}"
    ):
        il.decompose(model, handmade)
    labels = label_tokens(model.tokenizer, SPEC)
    with pytest.raises(ValueError, match="the queries hold token id 5000"):
        record(model, torch.tensor([1]), [torch.tensor([3, 5000])], labels)
    with pytest.raises(ValueError, match="label words hold token id 500"):
        record(model, torch.tensor([1]), [torch.tensor([3])], LabelTokens(((500,), (3,))))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([1, 2, 3]), TypeError, "must be a Prompt .* got Tensor"),
        ("Sentence: w1 Label:", TypeError, "must be a Prompt .* got str"),
    ],
)
def test_decompose_needs_a_prompt(model, bad, error, message):
    with pytest.raises(error, match=message):
        il.decompose(model, bad)


@pytest.mark.parametrize(
    "labels, error, message",
    [
        ((-1, 5), ValueError, "label token id -1 is outside"),
        ((5, VOCAB_SIZE), ValueError, f"label token id {VOCAB_SIZE} is outside"),
        ((1, 2, 3), ValueError, "a pair of token ids .* got 3 values"),
        ((5,), ValueError, "got 1 values"),
        ("ab", TypeError, "must be a pair of token ids"),
        (7, TypeError, "must be a pair of token ids"),
        ((1.5, 2), TypeError, "integer token ids, got 1.5"),
    ],
)
def test_decompose_label_tokens_are_checked(model, prompt, labels, error, message):
    with pytest.raises(error, match=message):
        il.decompose(model, prompt, label_tokens=labels)


def test_label_tokens_accept_tensors_and_numpy_ints(model, prompt):
    ids = label_tokens(model.tokenizer, SPEC).first
    a = il.decompose(model, prompt, label_tokens=torch.tensor(ids))
    b = il.decompose(model, prompt, label_tokens=ids)
    assert torch.equal(a.label_direction, b.label_direction)


def test_negative_label_ids_are_refused_by_label_tokens():
    with pytest.raises(ValueError, match=">= 0"):
        LabelTokens(((-1,), (3,)))
    with pytest.raises(TypeError, match="int token ids"):
        LabelTokens(((), (3,)))


def long_task(n_words: int, *, long_train: bool):
    """Two-class records; every train text ``n_words`` long when ``long_train``."""
    n = n_words if long_train else 2

    def rec(i):
        return {"text": " ".join(f"w{(i + j) % 90}" for j in range(n)), "label": i % 2}

    val = [{"text": "w1 w2", "label": i % 2} for i in range(4)]
    return task_from_records([rec(i) for i in range(6)], val, label_words=[" bad", " good"])


def test_compare_needs_at_least_one_shot(model):
    with pytest.raises(ValueError, match="shots must be >= 1, got 0"):
        il.compare(model, long_task(2, long_train=False), shots=0)


def test_compare_says_which_demonstrations_are_too_long(model):
    task = long_task(200, long_train=True)  # 200 words: more than the context of 128 alone
    with pytest.raises(
        ValueError, match=r"none of the 4 demonstrations fits .*more than 122 tokens \(up to 20\d\)"
    ):
        with pytest.warns(UserWarning, match="demonstration 1 has 20"):
            il.compare(model, task, shots=4)


def test_a_model_that_outputs_nan_is_called_broken_before_any_work(tmp_path):
    from tests.models import make_hf_model

    hf = make_hf_model("gpt2", n_layers=1)
    with torch.no_grad():
        hf.transformer.ln_f.weight.fill_(float("nan"))
    broken = il.load_model(hf, tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="the model itself is broken: its zero-shot logits .* NaN"):
        il.compare(broken, long_task(2, long_train=False), shots=2, checkpoint_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before the first checkpoint
