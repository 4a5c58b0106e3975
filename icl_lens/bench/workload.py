"""The benchmark's model and data: a random-init GPT-2 of any shape (or a real model
from a local directory, ``model=``) and seeded random ICL prompts of SST-2-like lengths
(a demonstration 25-30 tokens, a query 20-30).

>>> cfg = BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2, n_queries=3)
>>> prefix, queries, demos = synthetic_icl(cfg)
>>> len(queries), len(demos), int(prefix[0]) == BOS
(3, 2, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = [
    "BOS",
    "PAD",
    "BenchConfig",
    "build_hf_model",
    "build_model",
    "synthetic_icl",
    "write_task_file",
]

SPECIALS = ("<unk>", "<bos>", "<pad>")
TASK_WORDS = ("Sentence:", "Label:", "Negative", "Positive", "\n")
BOS, PAD = 1, 2


@dataclass
class BenchConfig:
    """Shape, workload and threads of one benchmark (defaults: the issue's setting)."""

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_vocab: int = 50257
    n_ctx: int = 0  # 0: the GPT-2 1024, raised to fit the longest prompt
    k: int = 32
    n_queries: int = 64
    batch_size: int = 8
    threads: int = 0  # 0: torch's default in this process
    demo_len: tuple[int, int] = (25, 30)
    query_len: tuple[int, int] = (20, 30)
    lr_grid: str = "short"
    control: bool = True
    seed: int = 0
    naive_sample: int = 0  # 0: every query through (a); n: the first n, time extrapolated
    repeat: int = 3  # runs of every mode but (a); the fastest counts
    model: tuple[str, ...] = ()  # a local model (directory, .gguf, or GGUF chunks in order)

    def check(self) -> None:
        """An early, plain error for a shape or workload that cannot run."""
        missing = [m for m in self.model if not Path(m).exists()]
        if missing:
            raise ValueError(
                f"--model {' '.join(missing)}: no such file or directory; the bench runs a "
                "local model: a Hugging Face directory, a .gguf file, or GGUF chunks in order"
            )
        if min(self.n_layers, self.d_model, self.n_heads, self.n_queries, self.batch_size) < 1:
            raise ValueError("layers, d-model, heads, queries and batch-size must be >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"d-model {self.d_model} is not a multiple of heads {self.n_heads}")
        if self.d_vocab < 40:
            raise ValueError(f"vocab {self.d_vocab} is too small: use at least 40")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")
        if self.k < 0 or self.naive_sample < 0 or self.threads < 0:
            raise ValueError("k, naive-sample and threads must be >= 0")
        if self.n_ctx and self.n_ctx < 1 + self.k * self.demo_len[1] + self.query_len[1]:
            raise ValueError(f"n-ctx {self.n_ctx} cannot hold {self.k} demonstrations + a query")

    @property
    def context(self) -> int:
        need = 1 + self.k * self.demo_len[1] + self.query_len[1] + 8
        return self.n_ctx or max(1024, 256 * math.ceil(need / 256))


# ---- model and data ------------------------------------------------------------------


def _tokenizer(d_vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_words = d_vocab - len(SPECIALS) - len(TASK_WORDS)
    if n_words < 16:
        raise ValueError(f"--vocab {d_vocab} is too small: use at least 40")
    words = list(SPECIALS) + list(TASK_WORDS) + [f"t{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="removed"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        name_or_path="icl-lens-bench/random-gpt2",
    )


def build_hf_model(cfg: BenchConfig):
    """A random-init transformers GPT-2 of ``cfg``'s shape (seeded) and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model {cfg.d_model} is not a multiple of heads {cfg.n_heads}")
    torch.manual_seed(cfg.seed)
    hf_cfg = GPT2Config(
        n_layer=cfg.n_layers,
        n_embd=cfg.d_model,
        n_head=cfg.n_heads,
        n_positions=cfg.context,
        vocab_size=cfg.d_vocab,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(hf_cfg).eval(), _tokenizer(cfg.d_vocab)


def build_model(cfg: BenchConfig):
    """A random-init GPT-2 of ``cfg``'s shape as a TransformerLens model (seeded), or
    the model in ``cfg.model``."""
    from icl_lens.model.loading import load_model

    if cfg.model:
        return load_model(cfg.model[0] if len(cfg.model) == 1 else list(cfg.model))
    hf, tokenizer = build_hf_model(cfg)
    return load_model(hf, tokenizer=tokenizer)


def _lengths(g: torch.Generator, n: int, bounds: tuple[int, int]) -> list[int]:
    return torch.randint(bounds[0], bounds[1] + 1, (n,), generator=g).tolist()


def synthetic_icl(
    cfg: BenchConfig, *, bos: int = BOS
) -> tuple[Int[Tensor, " prefix"], list[Int[Tensor, " query"]], list[Int[Tensor, " demo"]]]:
    """(prefix = BOS + k demonstrations, queries, demonstrations) of random token ids
    below ``cfg.d_vocab``."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    first = len(SPECIALS) + len(TASK_WORDS)
    demos = [
        torch.randint(first, cfg.d_vocab, (n,), generator=g)
        for n in _lengths(g, cfg.k, cfg.demo_len)
    ]
    queries = [
        torch.randint(first, cfg.d_vocab, (n,), generator=g)
        for n in _lengths(g, cfg.n_queries, cfg.query_len)
    ]
    prefix = torch.cat([torch.tensor([bos]), *demos]) if demos else torch.tensor([bos])
    return prefix, queries, demos


def write_task_file(cfg: BenchConfig, directory: Path) -> Path:
    """An SST-2-like local task file (``sst2.jsonl``: the paper's template and label
    words) of random words with the bench's lengths; k + 8 train, n_queries validation."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    n_words = cfg.d_vocab - len(SPECIALS) - len(TASK_WORDS)
    overhead = 4  # "Sentence:", "Label:", the label word, the separator

    def text(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(0, n_words, (n,), generator=g))

    rows = []
    for split, n, bounds in (
        ("train", cfg.k + 8, cfg.demo_len),
        ("validation", cfg.n_queries, cfg.query_len),
    ):
        for length in _lengths(g, n, bounds):
            label = int(torch.randint(0, 2, (1,), generator=g))
            rows.append({"text": text(max(1, length - overhead)), "label": label, "split": split})
    path = directory / "sst2.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
