"""``icl-lens bench``: what the demonstrations cost, measured offline.

    icl-lens bench                      # k=32, 64 queries, GPT-2-small shape, random init
    icl-lens bench --ft                 # + the FT step against a bare forward + backward
    icl-lens bench --pipeline           # + ``compare`` against its unavoidable passes
    icl-lens bench --layers 2 --d-model 64 --heads 4 --vocab 500 -k 4 --queries 8

The model is a random-init GPT-2 (``transformers.GPT2Config``, default 12 layers,
d_model 768, 12 heads, vocabulary 50257) loaded like any other model
(:func:`icl_lens.load_model`); demonstrations and queries are random token ids of
SST-2-like lengths (a demonstration 25-30 tokens, a query 20-30), seeded.

Modes, each timed in its own fresh Python process after one small warm-up forward, run
``--repeat`` times (default 3, interleaved) except (a); a mode's time is its fastest run,
the one least disturbed by other work on the machine (all runs are printed). (a) runs
once; its time is its fastest prompt's seconds per token times every prompt's tokens,
which favours (a):

- (a) ``naive``: every query's full ICL prompt (BOS + demonstrations + query), one at a
  time, through the model's own ``run_with_cache`` (every hook cached); the recorded
  quantities read from that cache.
- (b) ``capture``: icl-lens's capture path, :func:`icl_lens.records.record` exactly as
  :func:`icl_lens.compare` runs it (prefix run once and its key/value cache reused,
  right-padded query batches, only attn_out, scores and q hooked at the recorded
  position, logits at the prediction position, the first prompt checked against a
  full forward).
- (c) ``floor``: the same prefix pass and the same cached query batches with no capture
  hooks at all; logits at the prediction position only (the one hook in the floor, at
  ``unembed.hook_in``, does that selection), no check. Nothing a comparison needs can
  cost less on this model code.

``max_abs_diff`` is the largest absolute difference between (a)'s and (b)'s recorded
values: attention outputs, query vectors, the query-side score rows, the
demonstration scores (summed over heads) and the class scores.

Peak memory: each mode runs in a fresh process; just before the timed section the
kernel's resident high-water mark is reset (``/proc/self/clear_refs``), and the peak
is the high-water mark (``VmHWM``) after it. ``peak_mem_ratio`` is the ratio of (b)'s
to (c)'s working memory: the peak minus the resident size at the start of the timed
section (the loaded model, data and libraries, the same for every mode). The absolute
peaks are printed too. Where ``clear_refs`` is not writable the fallback is
``resource.getrusage`` maxrss minus the resident size at the start (said in the
output).

``--ft``: (d) :func:`icl_lens.finetune.finetune` (record_queries=True, as the chosen
learning rate's run in ``compare``; its model copy included) against (e) its floor: on a
copy made before the clock starts (as finetune trains one: the copy's K/V weights own
their storage, the bridge's are strided views of the joint QKV weight), for each
demonstration a bare forward, the mean next-token loss and a backward with only the
key/value projections requiring grad, then the SGD update.

``--pipeline``: (f) ``compare`` (``icl-lens run``'s engine) on a synthetic local task
file (SST-2 template, random words) with the short learning-rate grid, against (g) its
unavoidable passes run bare: ZSL and ICL recording forwards, and per learning rate the
FT training (as in (e)) and the FT evaluation forward; with the untrained-weights
control (default, as ``icl-lens run``) its ZSL, ICL, FT training and evaluation too.
(f) also prints where its time went.

The last line printed is JSON: ``speedup_vs_naive`` (a/b), ``ratio_to_floor`` (b/c),
``max_abs_diff``, ``peak_mem_ratio`` and, when run, ``ft_ratio`` (d/e) and
``pipeline_ratio`` (f/g).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BenchConfig",
    "bench",
    "build_model",
    "register",
    "synthetic_icl",
]

SPECIALS = ("<unk>", "<bos>", "<pad>")
TASK_WORDS = ("Sentence:", "Label:", "Negative", "Positive", "\n")
BOS, PAD = 1, 2
WHAT = ("attn_out", "scores", "q")  # what records.record hooks
BASE_MODES = ("naive", "capture", "floor")
MODES = (*BASE_MODES, "ft", "ft_floor", "pipeline", "pipeline_floor")


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

    def check(self) -> None:
        """An early, plain error for a shape or workload that cannot run."""
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


def build_model(cfg: BenchConfig):
    """A random-init GPT-2 of ``cfg``'s shape as a TransformerLens model (seeded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from icl_lens.loading import load_model

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
    hf = GPT2LMHeadModel(hf_cfg).eval()
    return load_model(hf, tokenizer=_tokenizer(cfg.d_vocab))


def _lengths(g: torch.Generator, n: int, bounds: tuple[int, int]) -> list[int]:
    return torch.randint(bounds[0], bounds[1] + 1, (n,), generator=g).tolist()


def synthetic_icl(cfg: BenchConfig) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(prefix = BOS + k demonstrations, queries, demonstrations) of random token ids."""
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
    prefix = torch.cat([torch.tensor([BOS]), *demos]) if demos else torch.tensor([BOS])
    return prefix, queries, demos


def _labels():
    from icl_lens.predict import LabelTokens

    first = len(SPECIALS)
    return LabelTokens(((first + 2,), (first + 3,)))  # "Negative", "Positive"


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


# ---- the modes ----------------------------------------------------------------------


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def naive_records(
    model, prefix: Tensor, queries: Sequence[Tensor], labels
) -> tuple[dict, list[float]]:
    """(a): ``run_with_cache`` of every hook on each full prompt, one at a time, and the
    quantities ``record`` keeps, read from the cache; and each prompt's seconds."""
    from icl_lens.adapter import adapt
    from icl_lens.predict import first_token_scores

    a = adapt(model)
    layers = range(a.n_layers)
    n_prefix = len(prefix)
    out: dict[str, list] = {k: [] for k in ("attn_out", "q", "query_scores", "demo_scores")}
    first, seconds = [], []
    with a.inference():
        for query in queries:
            t0 = time.perf_counter()
            tokens = torch.cat([prefix, query])[None].to(a.device)
            logits, cache = model.run_with_cache(tokens)
            p = len(tokens[0]) - 1
            out["attn_out"].append(
                torch.stack([cache[a.name(la, "attn_out")][0, p] for la in layers])
            )
            out["q"].append(torch.stack([cache[a.name(la, "q")][0, p] for la in layers]))
            scores = torch.stack([cache[a.name(la, "scores")][0, :, p] for la in layers])
            cols = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n_prefix, p + 1)])
            out["query_scores"].append(scores[..., cols].float().cpu())
            out["demo_scores"].append(scores[:, :, 1:n_prefix].sum(dim=1))
            first.append(first_token_scores(logits[:, p], labels))
            del cache, logits
            seconds.append(time.perf_counter() - t0)
    result = {k: torch.stack(v).float().cpu() for k, v in out.items() if k != "query_scores"}
    result["query_scores"] = out["query_scores"]
    result["class_scores"] = torch.cat(first)
    return result, seconds


def capture_records(model, prefix, queries, labels, batch_size: int) -> tuple[dict, str]:
    """(b): :func:`icl_lens.records.record`, as ``compare`` runs it; and the path taken."""
    records_module = importlib.import_module("icl_lens.records")

    paths = []
    real = records_module.PrefixRunner

    class Spy(real):  # only notes which path the runner took
        def run(self, *args, **kwargs):
            out = super().run(*args, **kwargs)
            paths.append(self.path if self.path == "cache" else f"full ({self.reason})")
            return out

    records_module.PrefixRunner = Spy
    try:
        rec = records_module.record(
            model, prefix, list(queries), labels, keep_queries=None, batch_size=batch_size
        )
    finally:
        records_module.PrefixRunner = real
    values = {
        "attn_out": rec.attn_out,
        "q": rec.q,
        "query_scores": rec.query_scores,
        "demo_scores": rec.demo_scores,
        "class_scores": rec.class_scores,
    }
    return values, (paths[-1] if paths else "none")


def bare_queries(model, prefix: Tensor, queries: Sequence[Tensor], batch_size: int) -> Tensor:
    """(c): the prefix once, then the cached query batches with no capture hooks;
    logits at each query's last token only. Returns those logits."""
    from icl_lens.adapter import adapt
    from icl_lens.hooks.capture import Capture
    from icl_lens.prefix import _forward_after_prefix, _prefix_state, pad_right

    a = adapt(model)
    none = Capture(a, what=())
    n_prefix = len(prefix)
    with a.inference():
        state, _ = _prefix_state(a, none, prefix[None].to(a.device), n_prefix)
        out = []
        for chunk in _batches(queries, batch_size):
            tokens, lengths = pad_right(chunk, PAD)
            mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
            mask = torch.cat([torch.ones(len(chunk), n_prefix, dtype=torch.long), mask], dim=1)
            last = (lengths - 1)[:, None]
            logits = _forward_after_prefix(
                a, state, none, tokens.to(a.device), last, mask.to(a.device), last.to(a.device)
            )
            out.append(logits[:, 0].cpu())
    return torch.cat(out)


def _kv_only(model):
    from icl_lens.adapter import adapt

    params = [p for _, p in adapt(model).kv_parameters(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def bare_finetune(model, seqs: Sequence[Tensor], lr: float) -> list[float]:
    """(e): per demonstration a bare forward, the mean next-token loss, a backward with
    only the K/V projections requiring grad, the SGD update. Trains ``model`` in place
    (the caller restores it)."""
    from icl_lens.adapter import adapt

    a = adapt(model)
    params = _kv_only(model)
    model.eval()
    losses = []
    for seq in seqs:
        tokens = seq[None].to(a.device)
        for p in params:
            p.grad = None
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad * lr)
        losses.append(float(loss.detach()))
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


@contextlib.contextmanager
def _kv_restored(model):
    """Put the K/V weights back after a bare training run (not timed work: compare
    trains a copy)."""
    from icl_lens.adapter import adapt

    saved = [(p, p.detach().clone()) for _, p in adapt(model).kv_parameters(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, x in saved:
                p.copy_(x)


class _StageTimer:
    """Inclusive wall time per wrapped function, to see where ``compare`` spends it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list = []

    def wrap(self, module, name: str, label: str | None = None) -> None:
        real = getattr(module, name)
        label = label or name

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(module, name, timed)
        self._undo.append((module, name, real))

    def restore(self) -> None:
        for module, name, real in reversed(self._undo):
            setattr(module, name, real)
        self._undo.clear()


def pipeline(model, cfg: BenchConfig, directory: Path) -> dict:
    """(f): ``compare`` on the synthetic task file, with a breakdown of its time."""
    # by module path: the package re-exports functions named like these modules
    compare_module = importlib.import_module("icl_lens.compare")
    finetune_module = importlib.import_module("icl_lens.finetune")
    untrained_module = importlib.import_module("icl_lens.untrained")

    task = write_task_file(cfg, directory)
    timer = _StageTimer()
    for module, name, label in (
        (compare_module, "record", "record (zsl, icl, ft recordings)"),
        (compare_module, "run_trial", "lr trial (ft train + eval)"),
        (compare_module, "predict_queries", "ft eval (predict_queries)"),
        (compare_module, "finetune", "ft train of the chosen lr (finetune)"),
        (finetune_module, "copy_model", "model copies (copy_model)"),
        (untrained_module, "copy_model", "model copies (copy_model)"),
        (compare_module, "untrained_copy", "untrained copy"),
        (compare_module, "measure", "metrics (measure)"),
        (compare_module, "_fingerprint_model", "model fingerprint"),
        (compare_module, "load_task", "load task"),
    ):
        timer.wrap(module, name, label)
    t0 = time.perf_counter()
    try:
        cmp = compare_module.compare(
            model,
            task,
            shots=cfg.k,
            seed=1,
            lr_grid=cfg.lr_grid,
            control=cfg.control,
            batch_size=cfg.batch_size,
            progress=False,
        )
    finally:
        timer.restore()
    total = time.perf_counter() - t0
    return {
        "accuracy": cmp.accuracy,
        "lr": cmp.lr,
        "k_effective": cmp.info["k_effective"],
        "breakdown": {k: [round(v, 3), timer.calls[k]] for k, v in timer.seconds.items()},
        "compare_seconds": total,
    }


def pipeline_floor(model, cfg: BenchConfig, directory: Path) -> dict:
    """(g): ``compare``'s unavoidable passes, bare, on the same prompts: ZSL, ICL, per
    learning rate FT training and evaluation, and the control's four."""
    from icl_lens.demonstrations import sample_demonstrations
    from icl_lens.finetune import lr_grid, training_sequences
    from icl_lens.prompts import encode, task_prompt
    from icl_lens.task_sources import load_task

    task = load_task(write_task_file(cfg, directory))
    tok, spec = model.tokenizer, task.spec
    demos = sample_demonstrations(task, cfg.k, seed=1)
    prompt = task_prompt(tok, spec, demos, task.validation[0])
    queries = [torch.tensor(encode(tok, spec.format_query(ex))) for ex in task.validation]
    bos, prefix, seqs = prompt.prefix[:1], prompt.prefix, training_sequences(prompt)
    grid = lr_grid(cfg.lr_grid)
    passes: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        passes[name] = passes.get(name, 0.0) + time.perf_counter() - t0

    rounds = [("", grid)] + ([("control ", grid[:1])] if cfg.control else [])
    for tag, lrs in rounds:  # the control model has the same shape: the same cost
        timed(tag + "zsl", lambda: bare_queries(model, bos, queries, cfg.batch_size))
        timed(tag + "icl", lambda: bare_queries(model, prefix, queries, cfg.batch_size))
        for lr in lrs:
            with _kv_restored(model):
                timed(tag + "ft train", lambda lr=lr: bare_finetune(model, seqs, lr))
                timed(tag + "ft eval", lambda: bare_queries(model, bos, queries, cfg.batch_size))
    return {"passes": {k: round(v, 3) for k, v in passes.items()}}


# ---- one mode in this process ----------------------------------------------------------


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))


class _Memory:
    """Peak resident memory of a section: the kernel's high-water mark, reset at the
    start where the kernel allows it."""

    def __enter__(self):
        gc.collect()
        self.method = "VmHWM after clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_kb = _status_kb("VmRSS")
        except OSError:
            self.method = "ru_maxrss"
            self.start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method == "ru_maxrss":
            self.peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            self.peak_kb = _status_kb("VmHWM")
        self.working_kb = max(0, self.peak_kb - self.start_kb)


def _max_abs_diff(a: dict, b: dict) -> tuple[float, dict]:
    """Over the queries (a) ran (all, or its sample)."""
    per = {}
    n = len(a["attn_out"])
    for key in ("attn_out", "q", "demo_scores", "class_scores"):
        per[key] = float((a[key] - b[key][:n]).abs().max())
    per["query_scores"] = max(
        float((x - y).abs().max())
        for x, y in zip(a["query_scores"], b["query_scores"][:n], strict=True)
    )
    return max(per.values()), per


def run_mode(mode: str, cfg: BenchConfig, out_dir: Path) -> dict:
    """Run one mode here and now (meant for a fresh process); returns its measurements."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    prefix, queries, demos = synthetic_icl(cfg)
    labels = _labels()
    with torch.no_grad():  # warm-up: allocator, lazy initialisation, thread pool
        model(prefix[None, :16])
    if mode in ("ft_floor", "pipeline_floor"):
        # train what finetune trains: a copy (copy_model gives the K/V weights their own
        # storage; on the bridge they are strided views of the joint QKV weight, and
        # training those is slower), made before the clock starts
        from icl_lens.finetune import copy_model

        model = copy_model(model)
        gc.collect()
    result: dict = {"mode": mode, "threads": torch.get_num_threads()}
    with _Memory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "naive":
            n = min(cfg.naive_sample or len(queries), len(queries))
            values, prompt_seconds = naive_records(model, prefix, queries[:n], labels)
            result["naive_prompts"] = n
        elif mode == "capture":
            values, result["path"] = capture_records(model, prefix, queries, labels, cfg.batch_size)
        elif mode == "floor":
            bare_queries(model, prefix, queries, cfg.batch_size)
        elif mode == "ft":
            from icl_lens.finetune import finetune

            seqs = [torch.cat([torch.tensor([BOS]), d]) for d in demos]
            ft = finetune(model, seqs, lr=1e-3, record_queries=True)
            result["loss"] = float(ft.losses[-1])
        elif mode == "ft_floor":
            seqs = [torch.cat([torch.tensor([BOS]), d]) for d in demos]
            with _kv_restored(model):
                result["loss"] = bare_finetune(model, seqs, 1e-3)[-1]
        elif mode == "pipeline":
            result.update(pipeline(model, cfg, out_dir))
        elif mode == "pipeline_floor":
            result.update(pipeline_floor(model, cfg, out_dir))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = time.process_time() - c0
    if mode == "naive":
        # (a) is one long run, not repeated: its estimate is its fastest prompt's seconds
        # per token times every prompt's tokens (the least disturbed rate, which favours
        # (a)); with --naive-sample the other prompts are extrapolated the same way
        tokens = [len(prefix) + len(q) for q in queries]
        rate = min(t / n for t, n in zip(prompt_seconds, tokens, strict=False))
        result["measured_seconds"] = result["seconds"]
        result["seconds"] = rate * sum(tokens)
        result["cpu_seconds"] *= result["seconds"] / result["measured_seconds"]
    result.update(
        peak_kb=mem.peak_kb, start_kb=mem.start_kb, working_kb=mem.working_kb, memory=mem.method
    )
    if mode in ("naive", "capture"):
        torch.save(values, out_dir / f"{mode}.pt")
    result["prefix_tokens"] = len(prefix)
    result["query_tokens"] = sum(len(q) for q in queries)
    return result


# ---- the benchmark ------------------------------------------------------------------


@dataclass
class BenchResult:
    """Measurements of every mode run, and the headline ratios."""

    config: BenchConfig
    modes: dict[str, dict]
    max_abs_diff: float | None = None
    diff_by_value: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (float("nan"), float("nan"))  # 1-min load before, after

    def _ratio(self, a: str, b: str, key: str = "seconds") -> float | None:
        if a in self.modes and b in self.modes:
            den = self.modes[b][key]
            return self.modes[a][key] / den if den else float("inf")
        return None

    def summary(self) -> dict:
        out = {
            "speedup_vs_naive": self._ratio("naive", "capture"),
            "ratio_to_floor": self._ratio("capture", "floor"),
            "max_abs_diff": self.max_abs_diff,
            "peak_mem_ratio": self._ratio("capture", "floor", "working_kb"),
        }
        if "ft" in self.modes:
            out["ft_ratio"] = self._ratio("ft", "ft_floor")
        if "pipeline" in self.modes:
            out["pipeline_ratio"] = self._ratio("pipeline", "pipeline_floor")
        return {
            k: (None if v is None else round(v, 6 if k == "max_abs_diff" else 3))
            for k, v in out.items()
        }


def _child(mode: str, cfg: BenchConfig, out_dir: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if cfg.threads:
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    cmd = [
        sys.executable,
        "-m",
        "icl_lens.bench",
        "--worker",
        mode,
        "--config",
        json.dumps(asdict(cfg)),
        "--out",
        str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench mode {mode!r} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    """One mode's runs: the fastest run's numbers (the least disturbed by other work on
    the machine), the largest memory peak, and every run's seconds."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    for key in ("peak_kb", "working_kb"):
        best[key] = max(r[key] for r in runs)
    return best


def bench(
    cfg: BenchConfig | None = None,
    *,
    modes: Sequence[str] = BASE_MODES,
    in_process: bool = False,
    log=None,
) -> BenchResult:
    """Run ``modes``, each in a fresh process (``in_process=True``: here, one after the
    other; memory numbers then mean little), and compare (a) with (b).

    >>> r = bench(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2,
    ...                       n_queries=3), in_process=True)       # doctest: +SKIP
    >>> r.summary()["max_abs_diff"] <= 1e-4                        # doctest: +SKIP
    True
    """
    cfg = cfg or BenchConfig()
    cfg.check()
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="icl-lens-bench-") as tmp:
        out_dir = Path(tmp)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(cfg.repeat):  # interleaved, so a busy spell hits every mode alike
            for mode in modes:
                if mode == "naive" and r:
                    continue
                if log:
                    log(f"running {mode} ({r + 1}/{1 if mode == 'naive' else cfg.repeat}) ...")
                one = run_mode(mode, cfg, out_dir) if in_process else _child(mode, cfg, out_dir)
                runs[mode].append(one)
        result = BenchResult(cfg, {m: _merge(rs) for m, rs in runs.items()})
        result.load = (load_before, os.getloadavg()[0])
        if "naive" in modes and "capture" in modes:
            a = torch.load(out_dir / "naive.pt")
            b = torch.load(out_dir / "capture.pt")
            result.max_abs_diff, result.diff_by_value = _max_abs_diff(a, b)
    return result


# ---- command line -------------------------------------------------------------------


def _mb(kb: float) -> str:
    return f"{kb / 1024:.0f} MB"


def format_result(r: BenchResult) -> str:
    c, m = r.config, r.modes
    any_mode = next(iter(m.values()))
    lines = [
        f"model: random-init GPT-2, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
        f"vocab {c.d_vocab}, context {c.context}; torch {torch.__version__}, "
        f"{any_mode['threads']} threads, {os.cpu_count()} CPUs; load average (1 min) "
        f"{r.load[0]:.2f} before, {r.load[1]:.2f} after",
        f"workload: k={c.k} demonstrations ({any_mode['prefix_tokens']} prefix tokens with "
        f"BOS), {c.n_queries} queries ({any_mode['query_tokens']} tokens), batch {c.batch_size}",
        "",
        f"{'mode':<44}{'seconds':>9}{'CPU s':>9}{'peak RSS':>11}{'working':>10}   runs (s)",
    ]
    names = {
        "naive": "(a) naive: run_with_cache per full prompt",
        "capture": "(b) icl-lens capture (record)",
        "floor": "(c) floor: prefix once + bare query batches",
        "ft": "(d) finetune, record_queries",
        "ft_floor": "(e) floor: bare fwd + bwd over K/V",
        "pipeline": "(f) compare (icl-lens run)",
        "pipeline_floor": "(g) floor: its unavoidable passes, bare",
    }
    for mode, res in m.items():
        runs = ", ".join(f"{x:.2f}" for x in res["all_seconds"])
        if mode == "naive":
            runs = f"{res['naive_prompts']} prompts in {res['measured_seconds']:.2f}"
        lines.append(
            f"{names[mode]:<44}{res['seconds']:>9.2f}{res['cpu_seconds']:>9.2f}"
            f"{_mb(res['peak_kb']):>11}{_mb(res['working_kb']):>10}   {runs}"
        )
    lines.append(
        f"seconds: the fastest of {c.repeat} interleaved runs; (a) runs once and counts its "
        "fastest prompt's seconds per token times all prompts' tokens (favours (a))"
    )
    lines.append(f"memory: {any_mode['memory']}; working = peak - resident at the start")
    if "capture" in m:
        lines.append(f"path taken by (b): {m['capture'].get('path')}")
    if r.max_abs_diff is not None:
        per = ", ".join(f"{k} {v:.2e}" for k, v in r.diff_by_value.items())
        lines.append(f"max |a - b| over recorded values: {r.max_abs_diff:.2e} ({per})")
    if "ft" in m and "ft_floor" in m:
        k = max(1, c.k)
        lines.append(
            f"FT per demonstration: {m['ft']['seconds'] / k * 1e3:.0f} ms vs floor "
            f"{m['ft_floor']['seconds'] / k * 1e3:.0f} ms"
        )
    if "pipeline" in m:
        p = m["pipeline"]
        lines.append(
            f"pipeline: accuracy {p['accuracy']}, lr {p['lr']:g}, k_effective {p['k_effective']}"
        )
        lines.append("  where compare's time went (inclusive seconds, calls):")
        for name, (s, n) in sorted(p["breakdown"].items(), key=lambda kv: -kv[1][0]):
            lines.append(f"    {name:<40}{s:>9.2f}{n:>5}")
    if "pipeline_floor" in m:
        lines.append("  unavoidable passes, bare (seconds):")
        for name, s in m["pipeline_floor"]["passes"].items():
            lines.append(f"    {name:<40}{s:>9.2f}")
    s = r.summary()
    lines.append("")
    lines.append(
        "ratios: "
        + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None and k != "max_abs_diff")
    )
    lines.append(json.dumps(s))
    return "\n".join(lines)


SWEEPS = {"k": "k", "queries": "n_queries"}


def sweep(cfg: BenchConfig, name: str, values: Sequence[int], log=None) -> list[dict]:
    """(a) (sampled per ``cfg.naive_sample``), (b) and (c) for each value of ``name``
    (``k`` or ``queries``)."""
    rows = []
    for v in values:
        one = replace(cfg, **{SWEEPS[name]: int(v)})
        r = bench(one, modes=BASE_MODES, log=log)
        s = r.summary()
        m = r.modes
        rows.append(
            {
                name: int(v),
                "prefix_tokens": m["capture"]["prefix_tokens"],
                "naive_s": m["naive"]["seconds"],
                "capture_s": m["capture"]["seconds"],
                "floor_s": m["floor"]["seconds"],
                "capture_cpu_s": m["capture"]["cpu_seconds"],
                "floor_cpu_s": m["floor"]["cpu_seconds"],
                "load": r.load,
                "speedup_vs_naive": s["speedup_vs_naive"],
                "ratio_to_floor": s["ratio_to_floor"],
                "peak_mem_ratio": s["peak_mem_ratio"],
                "max_abs_diff": s["max_abs_diff"],
                "path": m["capture"].get("path"),
            }
        )
    return rows


def format_sweep(rows: list[dict], name: str, cfg: BenchConfig) -> str:
    """A markdown table of a sweep, then its rows as JSON."""
    head = (
        f"| {name} | prefix tokens | (a) naive s | (b) capture s | (c) floor s "
        "| a/b | b/c | mem b/c | max abs diff | load before/after |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r[name]} | {r['prefix_tokens']} | {r['naive_s']:.1f} | {r['capture_s']:.2f} "
            f"| {r['floor_s']:.2f} | {r['speedup_vs_naive']:.1f} | {r['ratio_to_floor']:.2f} "
            f"| {r['peak_mem_ratio']:.2f} | {r['max_abs_diff']:.1e} "
            f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines.append(
        f"\nseconds: the fastest of {cfg.repeat} runs for (b) and (c); (a) its fastest "
        "prompt's seconds per token times all prompts' tokens"
        + (f" (it ran the first {cfg.naive_sample} prompts)" if cfg.naive_sample else "")
    )
    lines.append(json.dumps(rows))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--vocab", type=int, default=d.d_vocab)
    p.add_argument("--n-ctx", type=int, default=0, help="context (default: fits the prompts)")
    p.add_argument("-k", "--shots", type=int, default=d.k, help="demonstrations (default 32)")
    p.add_argument("--queries", type=int, default=d.n_queries, help="queries (default 64)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--repeat", type=int, default=d.repeat, help="runs per mode but (a); the fastest counts"
    )
    p.add_argument("--ft", action="store_true", help="also time the FT step against its floor")
    p.add_argument(
        "--pipeline", action="store_true", help="also time compare against its unavoidable passes"
    )
    p.add_argument("--lr-grid", default=d.lr_grid, help="grid of --pipeline (default short)")
    p.add_argument("--no-control", action="store_true", help="--pipeline without the control")
    p.add_argument("--skip-naive", action="store_true", help="no (a) (it is the slow one)")
    p.add_argument(
        "--naive-sample",
        type=int,
        default=0,
        help="run (a) on the first N queries only and scale its time by prompt tokens",
    )
    p.add_argument(
        "--sweep",
        default="",
        metavar="NAME=V1,V2,...",
        help="a scaling table of (a), (b), (c): k=4,8,16,32,64 or queries=16,32,64,128",
    )
    p.add_argument("--only", default="", help="comma-separated modes to run instead")
    p.add_argument("--in-process", action="store_true", help="no subprocesses (memory unusable)")


def config_from_args(args) -> BenchConfig:
    return BenchConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        d_vocab=args.vocab,
        n_ctx=args.n_ctx,
        k=args.shots,
        n_queries=args.queries,
        batch_size=args.batch_size,
        threads=args.threads or torch.get_num_threads(),
        lr_grid=args.lr_grid,
        control=not args.no_control,
        seed=args.seed,
        naive_sample=args.naive_sample,
        repeat=args.repeat,
    )


def modes_from_args(args) -> list[str]:
    if args.only:
        return [m.strip() for m in args.only.split(",") if m.strip()]
    modes = [m for m in BASE_MODES if not (args.skip_naive and m == "naive")]
    if args.ft:
        modes += ["ft", "ft_floor"]
    if args.pipeline:
        modes += ["pipeline", "pipeline_floor"]
    return modes


def main(args) -> int:
    from icl_lens.cli import UserError

    cfg = config_from_args(args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.sweep:
            name, _, values = args.sweep.partition("=")
            if name not in SWEEPS or not values:
                raise ValueError(f"--sweep {args.sweep!r}: use k=4,8,16 or queries=16,32,64")
            rows = sweep(cfg, name, [int(v) for v in values.split(",")], log=log)
            print(format_sweep(rows, name, cfg))
            return 0
        result = bench(cfg, modes=modes_from_args(args), in_process=args.in_process, log=log)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(format_result(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time icl-lens's capture path against run_with_cache and a bare floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="icl_lens.bench --worker")
    p.add_argument("--worker", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    raw = json.loads(args.config)
    raw["demo_len"], raw["query_len"] = tuple(raw["demo_len"]), tuple(raw["query_len"])
    cfg = replace(BenchConfig(), **raw)
    import warnings

    warnings.simplefilter("ignore")
    result = run_mode(args.worker, cfg, args.out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - the per-mode subprocess
    if "--worker" in sys.argv:
        sys.exit(_worker_main(sys.argv[1:]))
    from icl_lens.cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
