"""The per-head scan of the interventions study, timed against its floor.

A scan runs one intervention per head (``n_layers x n_heads``) on every query, on the
cached prefix, the interventions of a query batched along the batch dimension
(:class:`~icl_lens.hooks.intervention_runner.InterventionRunner`, as the study runs
it). Its floor is the same number of bare query passes on the same cached prefix, in
the same batches: each query repeated once per head, query-major, no hooks.

>>> from icl_lens.bench.workload import BenchConfig, build_model, synthetic_icl
>>> cfg = BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2, n_queries=2)
>>> model = build_model(cfg)
>>> prefix, queries, _ = synthetic_icl(cfg)
>>> out = head_scan(model, prefix, queries, "knockout", batch_size=4)
>>> out.logits.shape[:2], out.path  # [query, head]
(torch.Size([2, 4]), 'cache')
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from icl_lens.hooks import interventions as iv
from icl_lens.hooks.intervention_runner import InterventionLogits, InterventionRunner
from icl_lens.model.adapter import adapt

__all__ = ["SCAN_FORMS", "SCAN_MODES", "bare_scan", "head_scan", "scan_interventions"]

SCAN_FORMS = ("knockout", "restore", "linear", "fitted", "softmax")
SCAN_MODES = (*(f"scan_{form}" for form in SCAN_FORMS), "scan_floor")
CHECK_VOCAB = 512
"""Logits kept for the scan's check (softmax transplant == restore): the first ids."""


def scan_interventions(adapter, form: str) -> list[iv.Intervention]:
    """One intervention per head, layer-major: Knockout({h}), Restore({h}) or
    Transplant({h}, linear | fitted | softmax) (fitted with c_h = 0.5 for every head:
    the same work as any other scales)."""
    if form not in SCAN_FORMS:
        raise ValueError(f"unknown scan form {form!r}; choose from {', '.join(SCAN_FORMS)}")
    heads = iv.all_heads(adapter)
    if form == "knockout":
        return [iv.knockout(adapter, [h]) for h in heads]
    if form == "restore":
        return [iv.restore(adapter, [h]) for h in heads]
    scales = torch.full((adapter.n_layers, adapter.n_heads), 0.5) if form == "fitted" else None
    return [iv.transplant(adapter, [h], form, scales=scales) for h in heads]


def head_scan(
    model, prefix: Tensor, queries: Sequence[Tensor], form: str, *, batch_size: int
) -> InterventionLogits:
    """The per-head scan of ``form`` on every query, on the cached prefix (every prefix
    token but BOS a demonstration token, the runner's default)."""
    adapter = adapt(model)
    runner = InterventionRunner(adapter, prefix)
    return runner.run(list(queries), scan_interventions(adapter, form), batch_size=batch_size)


def bare_scan(
    model, prefix: Tensor, queries: Sequence[Tensor], n_heads: int, *, batch_size: int
) -> Tensor:
    """The scan's floor: each query ``n_heads`` times (query-major, as the scan's rows),
    bare passes after the prefix in batches of ``batch_size``."""
    from icl_lens.bench.modes import bare_queries

    rows = [q for q in queries for _ in range(n_heads)]
    return bare_queries(model, prefix, rows, batch_size)
