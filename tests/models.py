"""Small random-init models of real architectures, built offline from transformers
configs and loaded on whichever TransformerLens line is installed."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import icl_lens as il

WORDS = [f"w{i}" for i in range(90)] + ["Sentence:", "Label:", "good", "bad", "\n"]
SPECIALS = ["<unk>", "<bos>", "<pad>"]
VOCAB_SIZE = len(WORDS) + len(SPECIALS)
ARCHITECTURES = ("gpt2", "neox", "llama")
ROTARY_FRACTION = {"gpt2": 0.0, "neox": 0.5, "llama": 1.0}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        name_or_path="tests/word-level",
    )


def make_hf_model(arch: str, *, n_layers: int = 2, n_ctx: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        cfg = GPT2Config(n_positions=n_ctx, n_embd=32, n_layer=n_layers, n_head=4, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(
            max_position_embeddings=n_ctx,
            hidden_size=32,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            intermediate_size=64,
            rotary_pct=ROTARY_FRACTION["neox"],
            **common,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(
            max_position_embeddings=n_ctx,
            hidden_size=32,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def make_model(arch: str, **kwargs):
    """A hooked model (bridge on TL 4, HookedTransformer on TL 3) and its HF twin."""
    hf = make_hf_model(arch, **kwargs)
    return il.load_model(hf, tokenizer=make_tokenizer()), hf
