"""One run of the momentum study: a small GPT-2 trained from scratch on the toy corpus
(vanilla or with momentum attention, through the TransformerLens bridge), then measured
on held-out data: perplexity and ICL accuracy at each k.

>>> from icl_lens.momentum_study.config import StudyConfig
>>> tiny = StudyConfig(steps=2, batch_size=2, n_embd=16, n_head=2, eval_sequences=2,
...     eval_instances=1, eval_queries=2)
>>> run = train_run(tiny, "learned", seed=0)
>>> sorted(run["icl"]), run["grad_check"]["momentum_params_with_grad"]
(['arbitrary', 'canonical', 'overall'], 2)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from icl_lens.momentum_study.config import (
    ARBITRARY_SEED_BASE,
    CANONICAL_SEED_BASE,
    GROUPS,
    KINDS,
    PPL_SEED_BASE,
    StudyConfig,
    parse_variant,
)

__all__ = ["train_run"]


def _train_config(config: StudyConfig, seed: int):
    from icl_lens.toy.train import TrainConfig

    return TrainConfig(
        seed=seed,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        n_positions=config.n_positions,
        batch_size=config.batch_size,
        max_shots=config.max_shots,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        label_weight=config.label_weight,
        canonical_share=config.canonical_share,
        sinusoidal_positions=config.sinusoidal_positions,
    )


def _build(config: StudyConfig, seed: int):
    """``(bridge, hf_model, tokenizer, train_config)``: identical initial weights per seed."""
    import torch
    from transformers import GPT2LMHeadModel

    from icl_lens.model.loading import load_model
    from icl_lens.toy.tokenizer import build_tokenizer
    from icl_lens.toy.train import gpt2_config, sinusoids

    tc = _train_config(config, seed)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(gpt2_config(tc, len(tokenizer)))
    if tc.sinusoidal_positions:
        with torch.no_grad():
            hf_model.transformer.wpe.weight.copy_(sinusoids(tc.n_positions, tc.n_embd))
    model = load_model(hf_model, tokenizer=tokenizer)
    own = {id(p) for p in hf_model.parameters()}
    if not all(id(p) in own for p in model.parameters()):
        raise RuntimeError("the hooked model's parameters are not the Hugging Face model's")
    return model, hf_model, tokenizer, tc


def _lr_at(step: int, steps: int, tc) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, steps - tc.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def _grad_check(model, handle) -> dict[str, Any]:
    """After the first backward: which parameters got a finite gradient.

    The TL 4 bridge splits GPT-2's fused ``c_attn`` into separate q/k/v linears that the
    forward uses; the fused originals (``attn.qkv``) stay registered but get no gradient
    (AdamW skips them). Every other parameter, and every learned eta logit, must get one.
    """
    import torch

    def ok(p) -> bool:
        return p.grad is not None and bool(torch.isfinite(p.grad).all())

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    without = [n for n, p in named if not ok(p)]
    mom = list(handle.parameters()) if handle is not None else []
    check = {
        "model_params": len(named),
        "model_params_with_grad": len(named) - len(without),
        "model_params_without_grad": without,
        "momentum_params": len(mom),
        "momentum_params_with_grad": sum(ok(p) and bool(p.grad.any()) for p in mom),
    }
    if check["momentum_params_with_grad"] != check["momentum_params"]:
        raise RuntimeError(f"gradients do not reach the learned eta logits: {check}")
    if any(".attn.qkv." not in n for n in without):
        raise RuntimeError(f"gradients do not reach the model's parameters: {check}")
    return check


def _val_sequences(config: StudyConfig, tc):
    import torch

    from icl_lens.toy.train import SequenceMaker

    maker = SequenceMaker(tc)
    seqs = [maker.sequence(PPL_SEED_BASE + i)[0] for i in range(config.eval_sequences)]
    batches = []
    for start in range(0, len(seqs), config.eval_batch_size):
        chunk = seqs[start : start + config.eval_batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), maker.pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length))
        for b, s in enumerate(chunk):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1.0
        batches.append((ids, mask))
    return batches, maker


def _perplexity(model, config: StudyConfig, tc) -> dict[str, float]:
    """Unweighted next-token loss over held-out sequences, and on the label positions."""
    import torch
    import torch.nn.functional as F

    batches, maker = _val_sequences(config, tc)
    total, count, label_total, label_count = 0.0, 0.0, 0.0, 0
    for ids, mask in batches:
        logits = model(ids)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        w = mask[:, 1:]
        total += float((nll * w).sum())
        count += float(w.sum())
        # the label word is each sequence's last token
        last = mask.sum(1).long() - 1
        label_total += float(nll[torch.arange(len(ids)), last - 1].sum())
        label_count += len(ids)
    loss = total / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_label_loss": label_total / label_count,
        "val_tokens": int(count),
    }


def _icl_accuracy(model, tokenizer, config: StudyConfig) -> dict[str, dict[str, float]]:
    """Accuracy (%) per group (overall / canonical / arbitrary) and ``k``."""
    import torch

    from icl_lens.toy.evaluate import label_token_ids, prompt_ids
    from icl_lens.toy.task import toy_task

    k_max = max(config.shots)
    tasks = {
        kind: [
            toy_task(base + i, n_train=k_max, n_validation=config.eval_queries, kind=kind)
            for i in range(config.eval_instances)
        ]
        for kind, base in (("canonical", CANONICAL_SEED_BASE), ("arbitrary", ARBITRARY_SEED_BASE))
    }
    correct: dict[tuple[str, int], int] = {}
    total: dict[tuple[str, int], int] = {}
    pad = tokenizer.pad_token_id
    for kind, instances in tasks.items():
        for k in config.shots:
            items = []  # (prompt, candidates, gold)
            for task in instances:
                cand = label_token_ids(tokenizer, task.spec)
                demos = task.train[:k]
                for q in task.validation:
                    items.append((prompt_ids(tokenizer, task.spec, demos, q), cand, q.label))
            hits = 0
            for start in range(0, len(items), config.eval_batch_size):
                chunk = items[start : start + config.eval_batch_size]
                length = max(len(p) for p, _, _ in chunk)
                ids = torch.full((len(chunk), length), pad, dtype=torch.long)
                for b, (p, _, _) in enumerate(chunk):
                    ids[b, : len(p)] = torch.tensor(p)
                logits = model(ids)  # right padding: causal, so the last real position is exact
                for b, (p, cand, gold) in enumerate(chunk):
                    scores = logits[b, len(p) - 1, cand]
                    hits += int(int(scores.argmax()) == gold)
            correct[kind, k] = hits
            total[kind, k] = len(items)
    out: dict[str, dict[str, float]] = {}
    for group in GROUPS:
        kinds = KINDS if group == "overall" else (group,)
        out[group] = {
            str(k): 100.0 * sum(correct[g, k] for g in kinds) / sum(total[g, k] for g in kinds)
            for k in config.shots
        }
    return out


def train_run(
    config: StudyConfig,
    variant: str,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one (variant, seed) from scratch and measure it; returns a JSON-able dict.

    Keys: ``variant``, ``seed``, ``eta`` (initial), ``learnable``, ``final_eta``
    (``[layer][head]`` or None), ``grad_check`` (first step), ``history`` (mean training
    loss per ``log_every`` steps), ``val_loss``, ``val_ppl``, ``val_label_loss``, ``icl``
    (``{group: {k: accuracy %}}``), ``train_s``, ``eval_s``, ``torch_threads`` and
    ``train_config``.
    """
    import torch

    from icl_lens.hooks.momentum import add_momentum, remove_momentum
    from icl_lens.toy.train import SequenceMaker, label_loss, weighted_lm_loss

    eta, learnable = parse_variant(variant, config.learned_eta_init)
    model, hf_model, tokenizer, tc = _build(config, seed)
    handle = add_momentum(model, eta, learnable=learnable) if eta is not None else None
    try:
        model.train()
        named = list(model.named_parameters())
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = list(handle.parameters()) if handle is not None else []
        if extra:
            lr_scale = config.eta_lr_scale
            groups.append({"params": extra, "weight_decay": 0.0, "lr_scale": lr_scale})
        opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98))
        everything = [p for g in groups for p in g["params"]]
        maker = SequenceMaker(tc)
        history: list[dict[str, float]] = []
        grad_check: dict[str, int] = {}
        running = running_label = 0.0
        start = time.time()
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, config.steps, tc) * group.get("lr_scale", 1.0)
            ids, weights = maker.batch(step)
            logits = model(ids)
            loss = weighted_lm_loss(logits, ids, weights)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{variant} seed {seed}: loss {loss.item()} at {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                grad_check = _grad_check(model, handle)
            torch.nn.utils.clip_grad_norm_(everything, tc.grad_clip)
            opt.step()
            with torch.no_grad():
                running += loss.item()
                running_label += label_loss(logits, ids, weights, tc.label_weight).item()
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                n = step % config.log_every + 1
                row = {
                    "step": step + 1,
                    "loss": round(running / n, 4),
                    "label_loss": round(running_label / n, 4),
                    "elapsed_s": round(time.time() - start, 1),
                }
                history.append(row)
                if log:
                    log(f"{variant} seed {seed}: " + json.dumps(row))
                running = running_label = 0.0
        train_s = time.time() - start
        model.eval()
        start = time.time()
        with torch.no_grad():
            ppl = _perplexity(model, config, tc)
            icl = _icl_accuracy(model, tokenizer, config)
        eval_s = time.time() - start
        final_eta = handle.etas().tolist() if handle is not None else None
    finally:
        remove_momentum(model)
    return {
        "variant": variant,
        "seed": seed,
        "eta": eta,
        "learnable": learnable,
        "final_eta": final_eta,
        "grad_check": grad_check,
        "history": history,
        **ppl,
        "icl": icl,
        "icl_queries_per_kind": config.eval_instances * config.eval_queries,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "torch_threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in hf_model.parameters()),
        "train_config": asdict(tc),
    }
