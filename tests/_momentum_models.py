"""Tiny random models for the momentum tests, on whichever TransformerLens is installed.

Backends (each with a multi-head "mha" and a grouped-query "gqa" variant):
- ``hooked``: ``HookedTransformer`` (TransformerLens < 4 only),
- ``hf_bridge``: ``TransformerBridge.boot_transformers`` over random GPT-2 / Llama,
- ``hfcompat_bridge``: the same after ``enable_compatibility_mode()``,
- ``native_bridge``: ``TransformerBridge.boot_native``.

Every parameter gets a small random offset so biases (b_V, b_O) are non-zero.
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from torch import nn

TL_VERSION = version("transformer-lens")
TL_MAJOR = int(TL_VERSION.split(".")[0])
D_VOCAB = 102
BOS = 101

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # TL < 4
except ImportError:
    HookedTransformer = HookedTransformerConfig = None

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:
    TransformerBridge = None


def _jitter(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _hooked(attn: str) -> nn.Module:
    extra = (
        dict(positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)
        if attn == "gqa"
        else {}
    )
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=D_VOCAB,
        act_fn="gelu", normalization_type="LN", seed=0, **extra,
    )  # fmt: skip
    return HookedTransformer(cfg)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)} | {"<unk>": 100, "<bos>": BOS}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", eos_token="<bos>",
        pad_token="<bos>",
    )  # fmt: skip
    tok.init_kwargs["name_or_path"] = "toy"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def _hf_bridge(attn: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if attn == "gqa":
        hf = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=D_VOCAB,
                max_position_embeddings=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )  # fmt: skip
        )
    else:
        hf = GPT2LMHeadModel(
            GPT2Config(vocab_size=D_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        )
    hf.eval()
    return TransformerBridge.boot_transformers("toy", hf_model=hf, tokenizer=_tokenizer())


def _hf_bridge_compat(attn: str) -> nn.Module:
    bridge = _hf_bridge(attn)
    bridge.enable_compatibility_mode()  # HookedTransformer-equivalent weight processing
    return bridge


def _native_bridge(attn: str) -> nn.Module:
    cfg = dict(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=D_VOCAB,
        act_fn="gelu", seed=0,
    )  # fmt: skip
    if attn == "gqa":
        cfg |= dict(n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=4)
    return TransformerBridge.boot_native(cfg)


BACKENDS = {}
if HookedTransformer is not None:
    BACKENDS["hooked"] = _hooked
if TransformerBridge is not None:
    BACKENDS["hf_bridge"] = _hf_bridge
    BACKENDS["hfcompat_bridge"] = _hf_bridge_compat
    if hasattr(TransformerBridge, "boot_native"):
        BACKENDS["native_bridge"] = _native_bridge

MODEL_IDS = [f"{backend}-{attn}" for backend in BACKENDS for attn in ("mha", "gqa")]


def build(model_id: str) -> nn.Module:
    """A fresh float32 model for an id from :data:`MODEL_IDS`, e.g. ``"hf_bridge-gqa"``."""
    backend, attn = model_id.split("-")
    return _jitter(BACKENDS[backend](attn), seed=1)


def n_kv_heads(model: nn.Module) -> int:
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
