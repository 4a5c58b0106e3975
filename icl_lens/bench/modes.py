"""What each ``icl-lens bench`` mode runs, on a loaded :class:`Workload`.

(a) ``naive``, (b) ``capture``, (c) ``floor``, (d) ``ft``, (e) ``ft_floor``,
(f) ``pipeline``, (g) ``pipeline_floor``, the per-head scans ``scan_{form}`` and
their floor ``scan_floor`` (:mod:`icl_lens.bench.scan`): see :mod:`icl_lens.cli.bench` for what each
one is. :func:`run_once` times one run of one mode; measuring (memory, repeats,
subprocesses) is :mod:`icl_lens.bench.runner`'s job.

>>> w = Workload.load(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2,
...                               n_queries=3))
>>> run_once("floor", w, Path("."))["seconds"] > 0
True
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from icl_lens.bench.scan import CHECK_VOCAB, SCAN_MODES, bare_scan, head_scan
from icl_lens.bench.workload import (
    BOS,
    PAD,
    SPECIALS,
    BenchConfig,
    build_model,
    synthetic_icl,
    write_task_file,
)

__all__ = ["BASE_MODES", "MODES", "Workload", "run_once"]

BASE_MODES = ("naive", "capture", "floor")
MODES = (*BASE_MODES, "ft", "ft_floor", "pipeline", "pipeline_floor", *SCAN_MODES)


TRAIN_A_COPY = ("ft_floor", "pipeline_floor")
"""Floors that train in place, on :attr:`Workload.training_copy`."""


@dataclass
class Workload:
    """The model and the prompts every mode of one benchmark runs on.

    ``training_copy``: the copy the floors in :data:`TRAIN_A_COPY` train, made once at
    load and outside every timed section (as finetune trains one: copy_model gives the
    K/V weights their own storage; on the bridge they are strided views of the joint QKV
    weight, and training those is slower); ``None`` when no such mode is to run.
    """

    cfg: BenchConfig
    model: torch.nn.Module
    prefix: Tensor
    queries: list[Tensor]
    demos: list[Tensor]
    training_copy: torch.nn.Module | None = None
    bos: int = BOS

    @classmethod
    def load(cls, cfg: BenchConfig, modes: Sequence[str] = ()) -> Workload:
        """Build the model and prompts (and the training copy if ``modes`` need it), and
        warm up (allocator, lazy initialisation, thread pool) with one small forward."""
        from icl_lens.data.prompts import bos_id
        from icl_lens.model.copying import copy_model

        model = build_model(cfg)
        bos = BOS
        if cfg.model:  # random ids from the real vocabulary, after its own BOS
            cfg = replace(cfg, d_vocab=int(model.cfg.d_vocab))
            bos = bos_id(model.tokenizer)
        prefix, queries, demos = synthetic_icl(cfg, bos=bos)
        with torch.no_grad():
            model(prefix[None, :16])
        copy = copy_model(model) if set(modes) & set(TRAIN_A_COPY) else None
        return cls(cfg, model, prefix, queries, demos, copy, bos)

    @property
    def training_sequences(self) -> list[Tensor]:
        return [torch.cat([torch.tensor([self.bos]), d]) for d in self.demos]


def _labels():
    from icl_lens.study.predict import LabelTokens

    first = len(SPECIALS)
    return LabelTokens(((first + 2,), (first + 3,)))  # "Negative", "Positive"


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def naive_records(
    model, prefix: Tensor, queries: Sequence[Tensor], labels
) -> tuple[dict, list[float]]:
    """(a): ``run_with_cache`` of every hook on each full prompt, one at a time, and the
    quantities ``record`` keeps, read from the cache; and each prompt's seconds."""
    from icl_lens.model.adapter import adapt
    from icl_lens.study.predict import first_token_scores

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
            scores = torch.stack(  # -inf where masked, from the model's mask, as record keeps them
                [a.masked_as_neginf(la, cache[a.name(la, "scores")])[0, :, p] for la in layers]
            )
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
    """(b): :func:`icl_lens.study.records.record`, as ``compare`` runs it; and the path taken."""
    records_module = importlib.import_module("icl_lens.study.records")

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
    from icl_lens.hooks.capture import Capture
    from icl_lens.hooks.prefix import _forward_after_prefix, _prefix_state, pad_right
    from icl_lens.model.adapter import adapt

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
    from icl_lens.model.adapter import adapt

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
    from icl_lens.model.adapter import adapt

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
    from icl_lens.model.adapter import adapt

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
    compare_module = importlib.import_module("icl_lens.study.compare")
    stages_module = importlib.import_module("icl_lens.study.pipeline")
    plan_module = importlib.import_module("icl_lens.study.plan")
    finetune_module = importlib.import_module("icl_lens.study.finetune")
    untrained_module = importlib.import_module("icl_lens.model.untrained")

    task = write_task_file(cfg, directory)
    timer = _StageTimer()
    for module, name, label in (
        (stages_module, "record", "record (zsl, icl, ft recordings)"),
        (stages_module, "run_trial", "lr trial (ft train + eval)"),
        (stages_module, "predict_queries", "ft eval (predict_queries)"),
        (stages_module, "finetune", "ft train of the chosen lr (finetune)"),
        (finetune_module, "copy_model", "model copies (copy_model)"),
        (untrained_module, "copy_model", "model copies (copy_model)"),
        (stages_module, "untrained_copy", "untrained copy"),
        (stages_module, "measure", "metrics (measure)"),
        (plan_module, "fingerprint_model", "model fingerprint"),
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
            lr_extend=0,  # the passes of pipeline_floor: the grid as given,
            retest=False,  # no test-retest ceilings,
            n_draws=1,  # one control draw
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
    from icl_lens.data.demonstrations import sample_demonstrations
    from icl_lens.data.prompts import encode, task_prompt
    from icl_lens.data.task_sources import load_task
    from icl_lens.study.finetune import training_sequences
    from icl_lens.study.lr_search import lr_grid

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


def run_once(mode: str, w: Workload, directory: Path, *, naive_prompts: int = 0) -> dict:
    """Run ``mode`` once on ``w`` and return its wall and CPU seconds and what it reports;
    (a) and (b) also return their recorded ``values``. ``naive_prompts``: how many
    queries (a) runs (0: ``cfg.naive_sample`` or all); its ``seconds`` are then its
    fastest prompt's seconds per token times every query's prompt tokens, the least
    disturbed rate, which favours (a)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    cfg = w.cfg
    model = w.training_copy if mode in TRAIN_A_COPY else w.model
    if model is None:
        raise ValueError(f"{mode} trains a copy: load the workload with Workload.load(cfg, modes)")
    result: dict = {"mode": mode}
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "naive":
        n = min(naive_prompts or cfg.naive_sample or len(w.queries), len(w.queries))
        result["values"], prompt_seconds = naive_records(model, w.prefix, w.queries[:n], _labels())
        result["naive_prompts"] = n
    elif mode == "capture":
        result["values"], result["path"] = capture_records(
            model, w.prefix, w.queries, _labels(), cfg.batch_size
        )
    elif mode == "floor":
        bare_queries(model, w.prefix, w.queries, cfg.batch_size)
    elif mode == "ft":
        finetune_module = importlib.import_module("icl_lens.study.finetune")
        timer = _StageTimer()  # the model copy is once per learning rate, not per step
        timer.wrap(finetune_module, "copy_model")
        try:
            ft = finetune_module.finetune(model, w.training_sequences, lr=1e-3)
        finally:
            timer.restore()
        result["loss"] = float(ft.losses[-1])
        result["copy_seconds"] = timer.seconds.get("copy_model", 0.0)
    elif mode == "ft_floor":
        with _kv_restored(model):
            result["loss"] = bare_finetune(model, w.training_sequences, 1e-3)[-1]
    elif mode == "pipeline":
        result.update(pipeline(model, cfg, directory))
    elif mode == "scan_floor":
        n_heads = model.cfg.n_layers * model.cfg.n_heads
        bare_scan(model, w.prefix, w.queries, n_heads, batch_size=cfg.batch_size)
        result["interventions"] = len(w.queries) * n_heads
    elif mode.startswith("scan_"):
        out = head_scan(model, w.prefix, w.queries, mode[5:], batch_size=cfg.batch_size)
        result["path"], result["interventions"] = out.path, out.logits.shape[:2].numel()
        result["values"] = {"logits": out.logits[..., :CHECK_VOCAB].clone()}
    else:
        result.update(pipeline_floor(model, cfg, directory))
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0
    if mode == "naive":
        tokens = [len(w.prefix) + len(q) for q in w.queries]
        rate = min(t / n for t, n in zip(prompt_seconds, tokens, strict=False))
        result["measured_seconds"] = result["seconds"]
        result["seconds"] = rate * sum(tokens)
        result["cpu_seconds"] *= result["seconds"] / result["measured_seconds"]
    result["prefix_tokens"] = len(w.prefix)
    result["query_tokens"] = sum(len(q) for q in w.queries)
    return result
