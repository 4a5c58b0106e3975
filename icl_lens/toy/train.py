"""Train the embedded toy model: a small GPT-2 that learns the toy task in context.

Each training sequence is one training instance of the task family (instance seed
``>= TRAIN_SEED_BASE``): BOS, ``k`` demonstrations (``k`` uniform in ``0..max_shots``),
each followed by the separator, then one more demonstration (the "query" with its
label). The loss is next-token cross-entropy on every token, with the label-word
positions weighted ``label_weight`` times. Training runs for a fixed number of steps:
in-context learning appears abruptly and late, so a wall-clock budget would make the
result depend on the machine. The run is deterministic given the config and the
number of torch threads.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from icl_lens.toy.task import CANONICAL_SHARE, TRAIN_SEED_BASE, toy_task
from icl_lens.toy.tokenizer import build_raw_tokenizer, build_tokenizer


@dataclass
class TrainConfig:
    seed: int = 0
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 512
    batch_size: int = 32
    max_shots: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    label_weight: float = 5.0
    grad_clip: float = 1.0
    canonical_share: float = CANONICAL_SHARE
    min_lr_ratio: float = 0.1
    sinusoidal_positions: bool = True
    """Initialise the (trainable) position embeddings with sinusoids instead of noise:
    relative-position (recency) attention is then easy from step 0."""


def gpt2_config(config: TrainConfig, vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=True,
    )


def sinusoids(n_positions: int, dim: int, scale: float = 0.05) -> torch.Tensor:
    """Transformer sinusoidal position codes, scaled to the embeddings' size."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    out = torch.zeros(n_positions, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return scale * out


class SequenceMaker:
    """Builds training sequences (token ids + per-token loss weights) from instance seeds."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.raw = build_raw_tokenizer()
        self.bos = self.raw.token_to_id("<|bos|>")
        self.pad = self.raw.token_to_id("<|pad|>")

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids

    def sequence(self, instance_seed: int) -> tuple[list[int], list[float]]:
        k = random.Random(f"toy-shots-{instance_seed}").randint(0, self.config.max_shots)
        task = toy_task(
            instance_seed, n_train=k, n_validation=1, canonical_share=self.config.canonical_share
        )
        spec = task.spec
        ids, weights = [self.bos], [1.0]
        for ex in task.train:
            piece = self.encode(spec.format_demonstration(ex))
            sep = self.encode(spec.separator)
            ids += piece + sep
            weights += [1.0] * (len(piece) - 1) + [self.config.label_weight] + [1.0] * len(sep)
        piece = self.encode(spec.format_demonstration(task.validation[0]))
        ids += piece
        weights += [1.0] * (len(piece) - 1) + [self.config.label_weight]
        return ids, weights

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``; ``weights[:, t]`` weighs the prediction of ``ids[:, t]``."""
        c = self.config
        first = TRAIN_SEED_BASE + c.seed * 10**8 + step * c.batch_size
        seqs = [self.sequence(first + b) for b in range(c.batch_size)]
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        weights = torch.zeros((len(seqs), length))
        for b, (s, w) in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            weights[b, : len(w)] = torch.tensor(w)
        weights[:, 0] = 0.0  # BOS is never predicted
        return ids, weights


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Weighted next-token loss, normalised by the total weight."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum()


def label_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, label_weight):
    """Mean loss on label-word positions only (for logging)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = weights[:, 1:] == label_weight
    return nll[mask].mean()


def train(
    config: TrainConfig,
    steps: int,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
    probe_every: int = 0,
):
    """Train from scratch for ``steps`` steps; save to ``out_dir`` if given. Returns the model.

    ``probe_every > 0`` logs the 16-shot ICL accuracy on 8 held-out arbitrary-pair
    instances every that many steps (read-only: it does not change the run).
    """
    from transformers import GPT2LMHeadModel

    tokenizer = build_tokenizer()
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(gpt2_config(config, len(tokenizer)))
    if config.sinusoidal_positions:
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoids(config.n_positions, config.n_embd))
    model.train()
    maker = SequenceMaker(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)

    start = time.time()
    history = []
    running, running_label = 0.0, 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, weights = maker.batch(step)
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits
        loss = weighted_lm_loss(logits, ids, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        with torch.no_grad():
            running += loss.item()
            running_label += label_loss(logits, ids, weights, config.label_weight).item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            row = {
                "step": step + 1,
                "loss": round(running / n, 4),
                "label_loss": round(running_label / n, 4),
                "lr": lr_at(step),
                "elapsed_s": round(time.time() - start, 1),
            }
            if probe_every and (step + 1) % probe_every == 0:
                row["probe_icl_arbitrary"] = probe(model, tokenizer)
            history.append(row)
            if log:
                log(json.dumps(row))
            running, running_label = 0.0, 0.0
    model.eval()
    if out_dir is not None:
        save(model, tokenizer, out_dir, config, steps, history, time.time() - start)
    return model


def probe(model, tokenizer, instances: int = 8) -> float:
    """16-shot ICL accuracy (%) on held-out arbitrary-pair instances 900000 + i."""
    from icl_lens.toy.evaluate import evaluate_task

    was_training = model.training
    model.eval()
    rows = [
        evaluate_task(
            model,
            tokenizer,
            toy_task(900_000 + i, n_train=16, n_validation=10, kind="arbitrary"),
            16,
            10,
            (),
        )
        for i in range(instances)
    ]
    model.train(was_training)
    return round(100 * sum(r["icl"] for r in rows) / sum(r["n"] for r in rows), 1)


def save(model, tokenizer, out_dir, config: TrainConfig, steps: int, history, wall_s: float):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "train_config": asdict(config),
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "wall_s": round(wall_s, 1),
        "final": history[-1] if history else None,
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
