"""The embedded toy model: a 3-layer word-level GPT-2 that really learns in context.

>>> from icl_lens.toy import toy_task, load_toy_hf
>>> task = toy_task(0)                 # a held-out task instance (seeds < 10**6)
>>> model, tokenizer = load_toy_hf()   # transformers objects, eval mode, offline

See docs/toy-model.md for the task family, the training run and measured accuracies.
"""

from __future__ import annotations

from pathlib import Path

from icl_lens.toy.task import CANONICAL_SHARE, TRAIN_SEED_BASE, toy_task

__all__ = ["CANONICAL_SHARE", "TRAIN_SEED_BASE", "load_toy_hf", "toy_model_dir", "toy_task"]


def toy_model_dir() -> Path:
    """The directory of the packaged checkpoint (config, safetensors, tokenizer)."""
    return Path(__file__).resolve().parent / "checkpoint"


def load_toy_hf(model_dir: str | Path | None = None):
    """``(GPT2LMHeadModel, tokenizer)`` of the toy checkpoint, in eval mode, never online.

    The tokenizer is loaded with ``add_bos_token=True`` (it prepends ``<|bos|>``), which
    TransformerLens' ``TransformerBridge.boot_transformers(..., tokenizer=tok)`` expects.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path = Path(model_dir) if model_dir is not None else toy_model_dir()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no toy checkpoint in {path} (run scripts/train_toy.py)")
    model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, add_bos_token=True, local_files_only=True)
    return model, tokenizer
