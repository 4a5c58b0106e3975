"""Vanilla vs momentum attention, trained from scratch on the toy corpus (issue 7, part 2).

Every *run* trains one small GPT-2 (random init) for a fixed number of steps on the toy
task family's training sequences (:class:`icl_lens.toy.train.SequenceMaker`), through a
TransformerLens hooked model (:func:`icl_lens.load_model`) so that momentum attention
(:func:`icl_lens.hooks.momentum.add_momentum`) applies. A run is one *variant* and one *seed*:

- ``vanilla``: no momentum;
- ``eta0.5``, ``eta0.9`` (any ``eta<float>``): fixed ``eta`` on every head of every layer;
- ``learned``: ``eta`` learned per layer and head (``eta = sigmoid(logit)``, initialised
  at :attr:`StudyConfig.learned_eta_init`), trained with the model by the same AdamW and
  schedule, its learning rate scaled by :attr:`StudyConfig.eta_lr_scale` (10: Adam moves
  a logit by about ``lr`` per step, so at the model's rate ``eta`` could barely leave its
  initial value in a short run; set before any result was seen).

The budget is identical across variants for a seed: same initial weights, same batches in
the same order, same optimizer, schedule and number of steps. After training each run is
measured on held-out data (instance seeds below ``10**6``, never trained on):

- validation perplexity: ``exp`` of the mean next-token loss (unweighted) over
  :attr:`StudyConfig.eval_sequences` held-out toy sequences (instance seeds ``500000 + i``);
- ICL accuracy at ``k`` in :attr:`StudyConfig.shots` demonstrations on
  :attr:`StudyConfig.eval_instances` canonical instances (seeds ``600000 + i``) and as
  many arbitrary-pair instances (seeds ``700000 + i``), :attr:`StudyConfig.eval_queries`
  class-balanced queries each; ``overall`` pools both kinds (equal numbers of queries).
  A prediction is the instance's label word with the higher logit after ``Label:``.

:func:`run_study` runs every (variant, seed), in parallel processes with one torch
thread each, saves each run as it finishes (``OUT/runs/*.json``, so an interrupted study
resumes) and writes ``OUT/results.json``, ``OUT/summary.csv`` and ``OUT/momentum.svg``.
The command line is ``icl-lens momentum --out DIR``.

>>> from icl_lens.momentum_study.study import StudyConfig, parse_variant, train_run
>>> parse_variant("eta0.9"), parse_variant("learned"), parse_variant("vanilla")
((0.9, False), (0.5, True), (None, False))
>>> tiny = StudyConfig(steps=2, batch_size=2, n_embd=16, n_head=2, eval_sequences=2,
...     eval_instances=1, eval_queries=2)
>>> run = train_run(tiny, "learned", seed=0)
>>> sorted(run["icl"]), run["grad_check"]["momentum_params_with_grad"]
(['arbitrary', 'canonical', 'overall'], 2)
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "StudyConfig",
    "parse_variant",
    "run_study",
    "summarise",
    "svg_plot",
    "format_table",
    "markdown_table",
    "train_run",
    "write_outputs",
]

PPL_SEED_BASE = 500_000
CANONICAL_SEED_BASE = 600_000
ARBITRARY_SEED_BASE = 700_000
KINDS = ("canonical", "arbitrary")
GROUPS = ("overall", *KINDS)


@dataclass
class StudyConfig:
    """Everything that defines a study; the defaults are the documented run (docs/momentum.md).

    Every :class:`icl_lens.toy.train.TrainConfig` field is set from here (the toy trainer's
    own defaults may change); each run records the resulting ``train_config``.
    """

    variants: tuple[str, ...] = ("vanilla", "eta0.5", "eta0.9", "learned")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1200
    batch_size: int = 16
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 256
    max_shots: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_weight: float = 5.0
    canonical_share: float = 0.3
    sinusoidal_positions: bool = True
    learned_eta_init: float = 0.5
    eta_lr_scale: float = 10.0
    eval_sequences: int = 256
    eval_instances: int = 32
    eval_queries: int = 8
    shots: tuple[int, ...] = (0, 4, 16)
    eval_batch_size: int = 64
    log_every: int = 100

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.shots = tuple(int(k) for k in self.shots)
        for v in self.variants:
            parse_variant(v, self.learned_eta_init)
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"duplicate variants in {self.variants}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if max(self.shots, default=0) > self.max_shots * 4:
            raise ValueError(f"shots {self.shots} are far beyond the trained max_shots")
        if self.eval_queries % 2 or self.eval_queries < 2:
            raise ValueError("eval_queries must be even (queries are class-balanced in pairs)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parse_variant(name: str, learned_init: float = 0.5) -> tuple[float | None, bool]:
    """``(eta, learnable)`` of a variant name: ``vanilla``, ``eta<float>`` or ``learned``.

    ``vanilla`` gives ``(None, False)``; ``learned`` gives ``(learned_init, True)``.

    >>> parse_variant("eta0.25")
    (0.25, False)
    """
    if name == "vanilla":
        return None, False
    if name == "learned":
        return float(learned_init), True
    if name.startswith("eta"):
        try:
            eta = float(name[3:])
        except ValueError:
            eta = float("nan")
        if 0.0 <= eta <= 1.0:
            return eta, False
    raise ValueError(f"unknown variant {name!r}: use vanilla, learned or eta<float in [0, 1]>")


# -- one run ---------------------------------------------------------------------------


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


# -- the study -------------------------------------------------------------------------


def run_metrics(run: dict[str, Any], shots: Sequence[int]) -> dict[str, float]:
    """The flat metrics of one run: ``val_ppl``, ``val_loss``, ``icl_{group}_k{k}``, ..."""
    out = {
        "val_ppl": run["val_ppl"],
        "val_loss": run["val_loss"],
        "val_label_loss": run["val_label_loss"],
    }
    for group in GROUPS:
        for k in shots:
            out[f"icl_{group}_k{k}"] = run["icl"][group][str(k)]
    if run.get("final_eta") is not None:
        flat = [e for row in run["final_eta"] for e in row]
        out["eta_mean"] = sum(flat) / len(flat)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: list[dict[str, Any]], config: StudyConfig) -> dict[str, Any]:
    """Per variant and metric: n, mean, std (sample, ddof 1; None for one seed), min, max
    over seeds; and the
    paired difference to ``vanilla`` on the same seeds (``diff_vs_vanilla``), if present.

    >>> runs = [{"variant": v, "seed": s, "val_ppl": p, "val_loss": 0.0,
    ...          "val_label_loss": 0.0, "icl": {g: {"0": 50.0} for g in GROUPS}}
    ...         for v, s, p in [("vanilla", 0, 3.0), ("vanilla", 1, 5.0),
    ...                         ("eta0.5", 0, 2.0), ("eta0.5", 1, 5.0)]]
    >>> out = summarise(runs, StudyConfig(variants=("vanilla", "eta0.5"), shots=(0,)))
    >>> out["eta0.5"]["val_ppl"]["mean"], out["eta0.5"]["diff_vs_vanilla"]["val_ppl"]["mean"]
    (3.5, -0.5)
    """
    by_variant: dict[str, dict[int, dict[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], {})[run["seed"]] = run_metrics(run, config.shots)
    base = by_variant.get("vanilla", {})
    summary: dict[str, Any] = {}
    for variant in [v for v in config.variants if v in by_variant]:
        per_seed = by_variant[variant]
        names = list(next(iter(per_seed.values())))
        entry: dict[str, Any] = {"seeds": sorted(per_seed)}
        for name in names:
            entry[name] = _stats([m[name] for m in per_seed.values()])
        if variant != "vanilla" and base:
            common = sorted(set(per_seed) & set(base))
            entry["diff_vs_vanilla"] = {
                name: _stats([per_seed[s][name] - base[s][name] for s in common])
                for name in names
                if common and name in base[common[0]]
            }
        summary[variant] = entry
    return summary


def _run_path(out_dir: Path, variant: str, seed: int) -> Path:
    return out_dir / "runs" / f"{variant}_seed{seed}.json"


def _worker(config_dict: dict[str, Any], variant: str, seed: int, path: str, verbose: bool) -> str:
    """Process-pool entry: one torch thread, train, save atomically; returns the path."""
    import torch

    torch.set_num_threads(1)
    config = StudyConfig.from_dict(config_dict)
    log = (lambda line: print(line, flush=True)) if verbose else None
    run = train_run(config, variant, seed, log=log)
    run["study_config"] = config_dict
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)
    return path


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    jobs: int = 2,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train and measure every (variant, seed); write the outputs; return results.json's dict.

    Runs already saved under ``out_dir/runs`` with the same config are reused (resume).
    ``jobs > 1`` trains in that many spawned processes, one torch thread each; ``jobs=1``
    trains in this process (with its current torch thread count).
    """
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    todo, reused = [], 0
    for seed in config.seeds:  # seed-major, so a partial study has whole seeds
        for variant in config.variants:
            path = _run_path(out, variant, seed)
            if path.is_file():
                try:
                    if json.loads(path.read_text()).get("study_config") == cfg:
                        reused += 1
                        continue
                except json.JSONDecodeError:
                    pass
            todo.append((variant, seed, str(path)))
    if log and reused:
        log(f"reusing {reused} finished runs from {out / 'runs'}")
    start = time.time()
    load_start = os.getloadavg()
    if jobs <= 1 or len(todo) <= 1:
        for variant, seed, path in todo:
            if log:
                log(f"training {variant} seed {seed}")
            run = train_run(config, variant, seed, log=log)
            run["study_config"] = cfg
            Path(path).write_text(json.dumps(run, indent=1) + "\n")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(_worker, cfg, v, s, p, log is not None): (v, s) for v, s, p in todo
            }
            for fut in as_completed(futures):
                fut.result()
                if log:
                    v, s = futures[fut]
                    log(f"finished {v} seed {s} ({time.time() - start:.0f} s)")
    wall = time.time() - start
    runs = []
    for seed in config.seeds:
        for variant in config.variants:
            path = _run_path(out, variant, seed)
            if path.is_file():
                runs.append(json.loads(path.read_text()))
    results = {
        "config": cfg,
        "runs": runs,
        "summary": summarise(runs, config),
        "missing": [
            f"{v} seed {s}"
            for s in config.seeds
            for v in config.variants
            if not _run_path(out, v, s).is_file()
        ],
        "meta": {
            "wall_s": round(wall, 1),
            "runs_trained": len(todo),
            "runs_reused": reused,
            "jobs": jobs,
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    write_outputs(results, out)
    return results


# -- outputs ---------------------------------------------------------------------------

CSV_FIELDS = ("variant", "metric", "n", "mean", "std", "min", "max", "diff_mean", "diff_std")


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> None:
    """``results.json``, ``summary.csv`` (one row per variant and metric; ``diff_*`` is the
    paired difference to vanilla) and ``momentum.svg`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for variant, entry in results["summary"].items():
            diffs = entry.get("diff_vs_vanilla", {})
            for metric, st in entry.items():
                if metric in ("seeds", "diff_vs_vanilla"):
                    continue
                d = diffs.get(metric, {})
                writer.writerow(
                    [variant, metric, st["n"]]
                    + [_fmt(st[x]) for x in ("mean", "std", "min", "max")]
                    + [_fmt(d.get("mean")), _fmt(d.get("std"))]
                )
    config = StudyConfig.from_dict(results["config"])
    (out / "momentum.svg").write_text(svg_plot(results["runs"], config))


def _fmt(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_table(results: dict[str, Any]) -> str:
    """Mean ± std (over seeds) per variant: perplexity and ICL accuracy per group and k."""
    config = StudyConfig.from_dict(results["config"])
    cols = ["val_ppl"] + [f"icl_{g}_k{k}" for g in GROUPS for k in config.shots]
    heads = ["ppl"] + [f"{g[:4]} k={k}" for g in GROUPS for k in config.shots]
    widths = [max(13, len(h)) for h in heads]
    lines = ["variant   n " + " ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for variant, entry in results["summary"].items():
        cells = []
        for col, w in zip(cols, widths, strict=True):
            st = entry[col]
            prec = 3 if col == "val_ppl" else 1
            std = "-" if st["std"] is None else f"{st['std']:.{prec}f}"
            cells.append(f"{st['mean']:.{prec}f}±{std}".rjust(w))
        lines.append(f"{variant:8s} {len(entry['seeds']):2d} " + " ".join(cells))
    return "\n".join(lines)


def markdown_table(results: dict[str, Any], groups: Sequence[str] = GROUPS) -> str:
    """A Markdown table: per variant, mean ± std [min, max] over seeds of the perplexity and
    of the ICL accuracy (%) per group and k; then the paired difference to vanilla."""
    config = StudyConfig.from_dict(results["config"])
    cols = [("val_ppl", "val ppl", 2)]
    cols += [(f"icl_{g}_k{k}", f"{g} k={k}", 1) for g in groups for k in config.shots]

    def cell(st: dict[str, Any], prec: int, spread: bool = True) -> str:
        std = "n/a" if st["std"] is None else f"{st['std']:.{prec}f}"
        text = f"{st['mean']:.{prec}f} ± {std}"
        return text + (f" [{st['min']:.{prec}f}, {st['max']:.{prec}f}]" if spread else "")

    head = "| variant | seeds | " + " | ".join(name for _, name, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for variant, entry in results["summary"].items():
        cells = [cell(entry[c], p) for c, _, p in cols]
        lines.append(f"| {variant} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    diffs = [
        (v, e["diff_vs_vanilla"]) for v, e in results["summary"].items() if "diff_vs_vanilla" in e
    ]
    if diffs:
        lines += ["", "Paired difference to vanilla (same seed), mean ± std [min, max]:", ""]
        lines += [head.replace("| seeds |", "| pairs |"), "|" + "---|" * (len(cols) + 2)]
        for variant, d in diffs:
            cells = [cell(d[c], p) for c, _, p in cols]
            n = d[cols[0][0]]["n"]
            lines.append(f"| {variant} − vanilla | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_plot(
    runs: list[dict[str, Any]], config: StudyConfig, panels: Sequence[tuple[str, str]] | None = None
) -> str:
    """A self-contained SVG: one panel per metric, one column per variant, a dot per seed,
    the mean as a bar and ± one std as a whisker.

    >>> svg = svg_plot([], StudyConfig())
    >>> svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    True
    """
    if panels is None:
        panels = [("val_ppl", "validation perplexity (lower is better)")]
        panels += [
            (f"icl_overall_k{k}", f"ICL accuracy %, all instances, k={k}") for k in config.shots
        ]
        k_max = max(config.shots)
        panels += [
            (f"icl_arbitrary_k{k_max}", f"ICL accuracy %, arbitrary pairs, k={k_max}"),
            (
                f"icl_canonical_k{k_max}",
                f"ICL accuracy %, canonical pairs, k={k_max}",
            ),
        ]
    values: dict[str, dict[str, list[float]]] = {m: {} for m, _ in panels}
    for run in runs:
        metrics = run_metrics(run, config.shots)
        for m, _ in panels:
            if m in metrics:
                values[m].setdefault(run["variant"], []).append(metrics[m])
    variants = list(config.variants)
    cols = 3
    pw, ph = 300, 220  # panel size
    ml, mt, mb = 48, 34, 40  # margins inside a panel
    rows = math.ceil(len(panels) / cols)
    width, height = cols * pw + 10, rows * ph + 50
    title, legend = _title(runs, config)
    palette = ["#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="16" font-size="13" font-weight="bold">{_esc(title)}</text>',
        f'<text x="10" y="32" fill="#555">{_esc(legend)}</text>',
    ]
    for i, (metric, title) in enumerate(panels):
        ox, oy = (i % cols) * pw + 5, (i // cols) * ph + 40
        data = values[metric]
        flat = [x for xs in data.values() for x in xs]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
        if metric.startswith("icl_"):
            lo, hi = max(0.0, lo), min(100.0, hi)
        x0, x1, y0, y1 = ox + ml, ox + pw - 10, oy + mt, oy + ph - mb

        def y(v: float, lo: float = lo, hi: float = hi, y0: float = y0, y1: float = y1) -> float:
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        out.append(
            f'<text x="{ox + pw / 2}" y="{oy + 20}" text-anchor="middle">{_esc(title)}</text>'
        )
        out.append(
            f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" '
            'stroke="#999"/>'
        )
        for t in _nice_ticks(lo, hi):
            if lo <= t <= hi:
                yy = y(t)
                out.append(f'<line x1="{x0}" x2="{x1}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{x0 - 4}" y="{yy + 4:.1f}" text-anchor="end">{t:g}</text>')
        if metric.startswith("icl_") and lo < 50 < hi:  # chance: two label words
            out.append(
                f'<line x1="{x0}" x2="{x1}" y1="{y(50):.1f}" y2="{y(50):.1f}" stroke="#bbb" '
                'stroke-dasharray="4 3"/>'
            )
        slot = (x1 - x0) / max(1, len(variants))
        for j, variant in enumerate(variants):
            cx = x0 + slot * (j + 0.5)
            color = palette[j % len(palette)]
            out.append(
                f'<text x="{cx:.1f}" y="{y1 + 14}" text-anchor="middle">{_esc(variant)}</text>'
            )
            xs = data.get(variant, [])
            if not xs:
                continue
            mean = statistics.fmean(xs)
            std = statistics.stdev(xs) if len(xs) > 1 else 0.0
            out.append(
                f'<line x1="{cx - slot * 0.3:.1f}" x2="{cx + slot * 0.3:.1f}" y1="{y(mean):.1f}" '
                f'y2="{y(mean):.1f}" stroke="{color}" stroke-width="3"/>'
            )
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(max(lo, mean - std)):.1f}" '
                f'y2="{y(min(hi, mean + std)):.1f}" stroke="{color}" stroke-width="1.5"/>'
            )
            for n, v in enumerate(xs):
                dx = (n - (len(xs) - 1) / 2) * 6
                out.append(
                    f'<circle cx="{cx + dx:.1f}" cy="{y(v):.1f}" r="3" fill="{color}" '
                    'fill-opacity="0.55"/>'
                )
            out.append(
                f'<text x="{cx:.1f}" y="{y1 + 27}" text-anchor="middle" fill="#555">'
                f"{mean:.{3 if metric == 'val_ppl' else 1}f}</text>"
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _title(runs: list[dict[str, Any]], config: StudyConfig) -> tuple[str, str]:
    seeds = sorted({r["seed"] for r in runs})
    title = (
        f"Momentum attention vs vanilla, trained from scratch on the toy corpus "
        f"({config.n_layer} layers, d_model {config.n_embd}, {config.steps} steps x "
        f"{config.batch_size})"
    )
    legend = (
        f"seeds {seeds}; dot = one seed, bar = mean, whisker = ±1 std over seeds, "
        "dashed = chance (50%); held-out instances; the mean is printed under each variant"
    )
    return title, legend
