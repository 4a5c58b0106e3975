"""Small random-init models of real architectures, built offline from transformers
configs and loaded on whichever TransformerLens line is installed."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
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
ARCHITECTURES = ("gpt2", "neox", "llama", "gemma3")
ROTARY_FRACTION = {"gpt2": 0.0, "neox": 0.5, "llama": 1.0, "gemma3": 1.0}
GEMMA3_WINDOW = 8
"""Sliding window of the random-init Gemma 3: the test prompts are longer than it."""
GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention")
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
}


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


def _gemma3(n_layers: int, n_ctx: int, common: dict):
    """Gemma 3 in small: local (sliding-window) and global layers with their own rotary
    bases, QK-norm, one key/value head for four query heads, and a query scaling
    (query_pre_attn_scalar) that is not 1/sqrt(d_head). Norm weights are drawn (Gemma
    initialises them to zero, i.e. a scale of exactly 1) so that a missed norm shows."""
    layer_types = [GEMMA3_LAYER_TYPES[i % len(GEMMA3_LAYER_TYPES)] for i in range(n_layers)]
    cfg = Gemma3TextConfig(
        max_position_embeddings=n_ctx,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=GEMMA3_WINDOW,
        layer_types=layer_types,
        rope_parameters={k: dict(v) for k, v in GEMMA3_ROPE.items()},
        **common,
    )
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def make_hf_model(arch: str, *, n_layers: int | None = None, n_ctx: int = 128, seed: int = 0):
    """``n_layers`` defaults to 2 (3 for Gemma 3: local, global, local)."""
    n_layers = n_layers or (len(GEMMA3_LAYER_TYPES) if arch == "gemma3" else 2)
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
    elif arch == "gemma3":
        model = _gemma3(n_layers, n_ctx, common)
    else:
        raise ValueError(arch)
    return model.eval()


def make_model(arch: str, **kwargs):
    """A hooked model (bridge on TL 4, HookedTransformer on TL 3) and its HF twin."""
    hf = make_hf_model(arch, **kwargs)
    return il.load_model(hf, tokenizer=make_tokenizer()), hf
