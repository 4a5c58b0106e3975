"""Quick accuracy check of the toy model with plain transformers: ZSL, ICL and FT.

    python -m icl_lens.toy.evaluate --seeds 0 1 --instances 64 --queries 10

Evaluation seed ``s`` uses the held-out instance seeds ``s * 1000 + i`` for ``i`` in
``range(instances)`` (all below ``TRAIN_SEED_BASE``). Per instance, the demonstrations
are ``train[:shots]`` (class-balanced, in that order) and the queries
``validation[:queries]`` (class-balanced). A prediction is the label word with the
highest logit at the last prompt position, among the instance's two label words.

- ZSL: BOS + formatted query.
- ICL: BOS + each demonstration followed by the separator + formatted query.
- FT: a copy of the model whose attention K/V projections (the K and V thirds of each
  ``c_attn`` weight and bias; the Q third is frozen by masking its gradient) take one
  plain SGD step per demonstration (batch 1, one epoch, the ICL order), on the mean
  causal-LM loss over the tokens of BOS + formatted demonstration; then ZSL prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from icl_lens.data.tasks import Example, Task, TaskSpec


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def label_token_ids(tokenizer, spec: TaskSpec) -> list[int]:
    ids = []
    for word in spec.label_words:
        toks = encode(tokenizer, word)
        if len(toks) != 1:
            raise ValueError(f"label word {word!r} is {len(toks)} tokens, expected 1")
        ids.append(toks[0])
    return ids


def prompt_ids(tokenizer, spec: TaskSpec, demos: list[Example], query: Example) -> list[int]:
    ids = [tokenizer.bos_token_id]
    for demo in demos:
        ids += encode(tokenizer, spec.format_demonstration(demo) + spec.separator)
    return ids + encode(tokenizer, spec.format_query(query))


@torch.no_grad()
def predict(model, prompts: list[list[int]], candidates: list[int], pad_id: int) -> list[int]:
    """Index of the best candidate at each prompt's last position (right padding)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    logits = model(ids, attention_mask=torch.ones_like(ids)).logits
    last = torch.tensor([len(p) - 1 for p in prompts])
    scores = logits[torch.arange(len(prompts)), last][:, candidates]
    return scores.argmax(-1).tolist()


def kv_finetune(model, tokenizer, spec: TaskSpec, demos: list[Example], lr: float):
    """A copy of ``model`` after one epoch of K/V-only SGD (batch 1) on ``demos``."""
    ft = copy.deepcopy(model)
    ft.eval()  # no dropout anyway; keeps the forward identical to inference
    for p in ft.parameters():
        p.requires_grad_(False)
    params = []
    for block in ft.transformer.h:
        c_attn = block.attn.c_attn  # Conv1D: weight (d, 3d) = [Q | K | V] columns
        params += [c_attn.weight, c_attn.bias]
    for p in params:
        p.requires_grad_(True)
    d = ft.config.n_embd
    for demo in demos:
        ids = torch.tensor(
            [[tokenizer.bos_token_id, *encode(tokenizer, spec.format_demonstration(demo))]]
        )
        loss = ft(ids, labels=ids).loss  # mean over predicted tokens
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                g = g.clone()
                g[..., :d] = 0.0  # the Q third stays as it was
                p -= lr * g
    for p in params:
        p.requires_grad_(False)
    return ft


def evaluate_task(model, tokenizer, task: Task, shots: int, queries: int, lrs) -> dict:
    spec = task.spec
    cand = label_token_ids(tokenizer, spec)
    demos = task.train[:shots]
    qs = task.validation[:queries]
    gold = [q.label for q in qs]
    pad = tokenizer.pad_token_id
    zsl = predict(model, [prompt_ids(tokenizer, spec, [], q) for q in qs], cand, pad)
    icl = predict(model, [prompt_ids(tokenizer, spec, demos, q) for q in qs], cand, pad)
    out = {
        "kind": task.info.get("kind"),
        "n": len(qs),
        "zsl": sum(p == g for p, g in zip(zsl, gold, strict=True)),
        "icl": sum(p == g for p, g in zip(icl, gold, strict=True)),
        "ft": {},
    }
    for lr in lrs:
        ft = kv_finetune(model, tokenizer, spec, demos, lr)
        pred = predict(ft, [prompt_ids(tokenizer, spec, [], q) for q in qs], cand, pad)
        out["ft"][lr] = sum(p == g for p, g in zip(pred, gold, strict=True))
    return out


def summarise(rows: list[dict], lrs) -> dict:
    n = sum(r["n"] for r in rows)
    res = {
        "queries": n,
        "instances": len(rows),
        "zsl": 100 * sum(r["zsl"] for r in rows) / n,
        "icl": 100 * sum(r["icl"] for r in rows) / n,
        "ft": {str(lr): 100 * sum(r["ft"][lr] for r in rows) / n for lr in lrs},
    }
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()} | {
        "ft": {k: round(v, 2) for k, v in res["ft"].items()}
    }


def evaluate(model, tokenizer, seeds, instances=64, shots=16, queries=10, lrs=(0.1,)):
    from icl_lens.toy.task import toy_task

    report = {}
    for seed in seeds:
        rows = []
        for i in range(instances):
            task = toy_task(seed * 1000 + i, n_train=shots, n_validation=queries)
            rows.append(evaluate_task(model, tokenizer, task, shots, queries, lrs))
        entry = {"all": summarise(rows, lrs)}
        for kind in ("canonical", "arbitrary"):
            sub = [r for r in rows if r["kind"] == kind]
            if sub:
                entry[kind] = summarise(sub, lrs)
        report[str(seed)] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description="ZSL / ICL / FT accuracy of the toy model")
    parser.add_argument("--model-dir", default=None, help="default: the packaged checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from icl_lens.toy import load_toy_hf

    model, tokenizer = load_toy_hf(args.model_dir)
    start = time.time()
    report = evaluate(
        model, tokenizer, args.seeds, args.instances, args.shots, args.queries, args.lrs
    )
    report["_meta"] = vars(args) | {"wall_s": round(time.time() - start, 1)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
