"""The embedded toy model: task family, tokenizer, packaged checkpoint, training loop."""

from __future__ import annotations

import os

import pytest
import torch

from icl_lens.data.tasks import Task
from icl_lens.toy import TRAIN_SEED_BASE, load_toy_hf, toy_model_dir, toy_task
from icl_lens.toy.task import ARBITRARY_WORDS, CANONICAL_PAIRS, NEGATIVE_WORDS, POSITIVE_WORDS
from icl_lens.toy.tokenizer import build_tokenizer

HAS_CHECKPOINT = (toy_model_dir() / "model.safetensors").is_file()
needs_checkpoint = pytest.mark.skipif(not HAS_CHECKPOINT, reason="no packaged toy checkpoint")


def _valence(text: str) -> int:
    words = text.split()
    return sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)


def test_task_is_deterministic_per_seed():
    a, b, c = toy_task(7), toy_task(7), toy_task(8)
    assert isinstance(a, Task)
    assert a.spec == b.spec and a.train == b.train and a.validation == b.validation
    assert (a.spec, a.train) != (c.spec, c.train)


def test_splits_are_independent_of_each_others_size():
    small, big = toy_task(3, n_train=4, n_validation=6), toy_task(3, n_train=40, n_validation=6)
    assert small.validation == big.validation
    assert [e.label for e in small.train] == [e.label for e in big.train[:4]]
    assert small.spec == big.spec


@pytest.mark.parametrize("seed", range(10))
def test_task_is_class_balanced_and_follows_its_rule(seed):
    task = toy_task(seed, n_train=16, n_validation=20)
    for split in (task.train, task.validation):
        labels = [e.label for e in split]
        for k in range(2, len(labels) + 1, 2):  # every even prefix is balanced
            assert sum(labels[:k]) == k // 2
        for e in split:
            v = _valence(e.fields["text"])
            assert (v > 0) == (e.label == 1) and v != 0
            words = e.fields["text"].split()
            assert 4 <= len(words) <= 7
            assert words[-1] in (POSITIVE_WORDS if e.label else NEGATIVE_WORDS)


def test_kinds_and_label_words():
    canon = {tuple(" " + w for w in p) for p in CANONICAL_PAIRS}
    kinds = {}
    for seed in range(200):
        task = toy_task(seed)
        kinds[task.info["kind"]] = kinds.get(task.info["kind"], 0) + 1
        words = task.spec.label_words
        assert len(words) == 2 and words[0] != words[1]
        if task.info["kind"] == "canonical":
            assert words in canon
        else:
            assert all(w.strip() in ARBITRARY_WORDS for w in words)
        assert task.info["held_out"]
    assert 40 <= kinds["canonical"] <= 100 and kinds["arbitrary"] >= 100
    assert toy_task(5, kind="arbitrary").info["kind"] == "arbitrary"
    assert toy_task(5, kind="canonical").spec.label_words in canon
    assert not toy_task(TRAIN_SEED_BASE).info["held_out"]
    with pytest.raises(ValueError):
        toy_task(0, kind="other")


def test_tokenizer_pieces_are_clean():
    tok = build_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    vocab = tok.get_vocab()
    task = toy_task(1)
    assert len(enc(task.spec.separator)) == 1
    for pair in CANONICAL_PAIRS:
        for w in pair:
            assert enc(" " + w) == [vocab[w]]
    for w in ARBITRARY_WORDS:
        assert enc(" " + w) == [vocab[w]]
    assert len(enc("Sentence:")) == 1 and len(enc("Label:")) == 1
    ex = task.train[0]
    piece = enc(task.spec.format_demonstration(ex) + task.spec.separator)
    assert tok.unk_token_id not in piece
    assert len(piece) == len(ex.fields["text"].split()) + 4  # Sentence: ... Label: y \n
    assert tok("Sentence:")["input_ids"][0] == tok.bos_token_id


@needs_checkpoint
def test_checkpoint_loads_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model, tok = load_toy_hf()
    assert not model.training
    assert tok.init_kwargs.get("name_or_path") and tok.init_kwargs.get("add_bos_token")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (toy_model_dir() / f).is_file()
    size = sum(p.stat().st_size for p in toy_model_dir().iterdir())
    assert size < 15 * 2**20
    assert model.config.vocab_size == len(tok)


@needs_checkpoint
def test_checkpoint_boots_in_transformer_bridge_with_identical_logits():
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = load_toy_hf()
    bridge = TransformerBridge.boot_transformers("toy", hf_model=model, tokenizer=tok, device="cpu")
    task = toy_task(0)
    text = "".join(task.spec.format_demonstration(e) + "\n" for e in task.train[:4])
    text += task.spec.format_query(task.validation[0])
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    assert torch.equal(bridge.to_tokens(text).cpu(), ids)
    with torch.no_grad():
        hf_logits = model(ids).logits
        tl_logits = bridge(ids)
    torch.testing.assert_close(tl_logits, hf_logits, atol=1e-4, rtol=1e-4)


@needs_checkpoint
def test_checkpoint_learns_in_context_quickly_checked():
    """A small sanity check (the full measurement is in docs/toy-model.md)."""
    from icl_lens.toy.evaluate import evaluate

    model, tok = load_toy_hf()
    report = evaluate(model, tok, seeds=[0], instances=8, shots=16, queries=10, lrs=())
    res = report["0"]["all"]
    assert res["icl"] >= res["zsl"] + 10


def test_training_smoke(tmp_path):
    from icl_lens.toy import load_toy_hf as load
    from icl_lens.toy.train import TrainConfig, train

    config = TrainConfig(n_layer=1, n_embd=16, n_head=2, n_positions=256, batch_size=2)
    logs = []
    model = train(config, steps=3, out_dir=tmp_path, log=logs.append, log_every=1)
    assert len(logs) == 3
    assert not model.training
    loaded, tok = load(tmp_path)
    ids = tok("Sentence: great film Label: good", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # deterministic given the seed
    again = train(config, steps=3, out_dir=None, log=None)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_kv_finetune_touches_only_keys_and_values():
    from transformers import GPT2LMHeadModel

    from icl_lens.toy.evaluate import kv_finetune, prompt_ids
    from icl_lens.toy.train import TrainConfig, gpt2_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = TrainConfig(n_layer=2, n_embd=16, n_head=2, n_positions=256)
    model = GPT2LMHeadModel(gpt2_config(config, len(tok))).eval()
    task = toy_task(2, n_train=4)
    ft = kv_finetune(model, tok, task.spec, task.train, lr=0.5)
    d = config.n_embd
    for (name, p), q in zip(model.named_parameters(), ft.parameters(), strict=True):
        if "c_attn" in name:
            assert torch.equal(p[..., :d], q[..., :d])  # Q third frozen
            assert not torch.equal(p[..., d:], q[..., d:])  # K and V thirds trained
        else:
            assert torch.equal(p, q)
    ids = prompt_ids(tok, task.spec, task.train[:2], task.validation[0])
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("\n")) == 2


def test_training_sequences_match_evaluation_prompts():
    from icl_lens.toy.evaluate import prompt_ids
    from icl_lens.toy.train import SequenceMaker, TrainConfig

    config = TrainConfig()
    maker = SequenceMaker(config)
    tok = build_tokenizer()
    seed = TRAIN_SEED_BASE + 12345
    ids, weights = maker.sequence(seed)
    task = toy_task(seed, n_train=(len([w for w in weights if w > 1]) - 1), n_validation=1)
    query = task.validation[0]
    expected = prompt_ids(tok, task.spec, task.train, query)
    expected += tok(task.spec.label_words[query.label], add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert weights[-1] == config.label_weight
