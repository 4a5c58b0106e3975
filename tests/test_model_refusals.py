"""load_model refuses, before any work, the model sources that used to run silently
wrong or die in a traceback (issue 14): encoders, damaged weights, missing or foreign
tokenizers, and local paths with a typo."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, PreTrainedTokenizerFast

import icl_lens as il
from icl_lens.model.validation import check_local_source, looks_like_path
from tests.models import VOCAB_SIZE, make_hf_model, make_tokenizer


def tiny_bert_config(**kw) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **kw,
    )


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<bos>"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    make_hf_model("gpt2", n_layers=1).save_pretrained(root)
    return root


def test_an_encoder_directory_is_refused_naming_its_architecture(tmp_path):
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BertForMaskedLM.*causal decoder-only"):
        il.load_model(tmp_path)


def test_an_in_memory_encoder_is_refused():
    # BertLMHeadModel is what AutoModelForCausalLM builds from a BERT config
    with pytest.raises(ValueError, match=r"encoder \(BertLMHeadModel"):
        il.load_model(BertLMHeadModel(tiny_bert_config()), tokenizer=make_tokenizer())


def test_a_directory_without_tokenizer_says_so_and_a_tokenizer_can_be_passed(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*--tokenizer"):
        il.load_model(model_dir)
    make_tokenizer().save_pretrained(tmp_path)
    model = il.load_model(model_dir, tokenizer=str(tmp_path))
    assert len(model.tokenizer) == VOCAB_SIZE


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_safetensors_is_refused_naming_the_file(model_dir, tmp_path, damage):
    data = (model_dir / "model.safetensors").read_bytes()
    for f in model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"x" * 100}
    (tmp_path / "model.safetensors").write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        il.load_model(tmp_path, tokenizer=make_tokenizer())


def test_a_tokenizer_that_does_not_fit_the_embeddings_is_refused():
    hf = make_hf_model("gpt2", n_layers=1)
    bigger = make_tokenizer()
    bigger.add_tokens([f"extra{i}" for i in range(5)])
    with pytest.raises(ValueError, match=f"has {VOCAB_SIZE + 5} tokens.*{VOCAB_SIZE} token emb"):
        il.load_model(hf, tokenizer=bigger)
    with pytest.raises(ValueError, match="another model's tokenizer"):
        il.load_model(hf, tokenizer=word_tokenizer(["a", "b", "c"]))


@pytest.mark.parametrize("typo", ["./modle", "../x/modle", "runs/a/modle", "modle.safetensors"])
def test_a_local_path_with_a_typo_is_not_sent_to_the_hub(typo):
    with pytest.raises(FileNotFoundError, match=f"no such directory: '{typo}'"):
        il.load_model(typo)


def test_typo_suggestion_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "models" / "gpt2-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="did you mean 'models/gpt2-tiny'"):
        check_local_source("models/gpt2-tinyy")  # one slash, but models/ is a local folder
    with pytest.raises(FileNotFoundError, match="is a file"):
        (tmp_path / "model.safetensors").write_bytes(b"")
        check_local_source("model.safetensors")
    assert not looks_like_path("EleutherAI/pythia-70m") and not looks_like_path("gpt2")
    check_local_source("EleutherAI/pythia-70m")  # a hub id: left to the hub


def test_a_tokenizer_for_a_hub_model_is_refused_not_ignored():
    with pytest.raises(ValueError, match="loaded from the hub with its own tokenizer"):
        il.load_model("gpt2", tokenizer=make_tokenizer())
