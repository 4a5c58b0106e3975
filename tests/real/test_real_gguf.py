"""Gemma 3 270M from its GGUF chunks: the TransformerLens model computes the transformers
model's logits, it is a working language model, the chunks join in the order their names
say into one well-formed GGUF, and the conversion is cached with the hashes of its files."""

from __future__ import annotations

import pytest
import torch

from icl_lens.model import gguf

PROMPT = "Review: a gripping, tender film Sentiment: Positive\nReview: a dull mess Sentiment:"


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_chunks):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf.converted_dir(gemma3_chunks), dtype=torch.float32
    ).eval()


def test_logits_match_the_transformers_model(gemma3, hf_gemma3):
    tokens = gemma3.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert tokens[0, 0].item() == gemma3.tokenizer.bos_token_id
    with torch.no_grad():
        ours = gemma3(tokens)
        theirs = hf_gemma3(tokens).logits
    assert ours.shape == theirs.shape == (1, tokens.shape[1], 262144)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_the_dequantised_model_is_a_working_language_model(gemma3):
    # Q4_K_M blocks decoded wrongly give noise; a real 270M model completes facts
    for prompt, answer in [
        ("Paris is the capital of", "France"),
        ("The Eiffel Tower is in the city of", "Paris"),
    ]:
        tokens = gemma3.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            top = gemma3(tokens)[0, -1].argmax().item()
        assert gemma3.tokenizer.decode([top]) == " " + answer, prompt
    assert gemma3.cfg.n_layers == 18 and gemma3.cfg.n_heads == 4
    assert next(gemma3.parameters()).dtype == torch.float32


def test_a_second_load_reuses_the_conversion(gemma3, gemma3_chunks, monkeypatch):
    first = gguf.converted_dir(gemma3_chunks)  # the gemma3 fixture converted (or found) it

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(gguf, "_convert", no_conversion)
    monkeypatch.setattr(gguf, "_require_reader", no_conversion)
    assert gguf.converted_dir(gemma3_chunks) == first
    assert gguf._entry_damage(first, gguf._sha256(gemma3_chunks)) is None  # files as written
    assert first.parent.parent == gguf.cache_root()
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert not list(first.parent.glob(f".partial-{first.name}-*"))


def test_the_chunks_in_any_order_are_one_source(gemma3_chunks):
    swapped = [gemma3_chunks[i] for i in (0, 2, 1, 3)]
    assert gguf.gguf_files(swapped) == gguf.gguf_files(gemma3_chunks[::-1]) == gemma3_chunks


def test_the_joined_chunks_are_one_well_formed_gguf(gemma3_chunks, tmp_path):
    from icl_lens.model.gguf_chunks import check_layout

    joined = tmp_path / "gemma.gguf"
    with joined.open("wb") as out:
        for chunk in gemma3_chunks:
            out.write(chunk.read_bytes())
    # raises if its header does not place every tensor inside the file, end to end
    # (refusals are tested on tiny files in tests/test_gguf.py)
    check_layout(joined, "Gemma 3 270M")
