"""Adapt once: the adapter made at the top of a public function is passed down (FT and
untrained copies get ``adapter.with_model(copy)``), and every public function that takes
a model takes its adapter too, with the same result."""

from __future__ import annotations

import pytest
import torch

import icl_lens as il
import icl_lens.model.adapter as adapter_module
from icl_lens.model.untrained import untrained_copy
from icl_lens.study.predict import label_tokens, predict
from icl_lens.toy import toy_task
from icl_lens.views.attention import attention_comparison


@pytest.fixture(scope="module")
def toy():
    return il.toy_model()


@pytest.fixture(scope="module")
def task():
    return toy_task(1_000_003, n_train=32, n_validation=8)


@pytest.fixture
def adaptations(monkeypatch):
    """Counts the adapters built from a model (``adapt`` on an adapter returns it)."""
    calls = []
    original = adapter_module._line_of

    def counting(model):
        calls.append(type(model).__name__)
        return original(model)

    monkeypatch.setattr(adapter_module, "_line_of", counting)
    return calls


def test_compare_adapts_the_model_once(toy, task, adaptations):
    """ZSL, ICL, the retest, every lr trial, FT, its retest and the untrained control
    (two draws) all run on the one adapter compare made."""
    cmp = il.compare(
        toy,
        task,
        shots=4,
        max_queries=8,
        lr_grid=[0.01, 0.1],
        lr_extend=0,
        n_draws=2,
        n_resamples=20,
        progress=False,
    )
    assert "untrained_weights" in set(cmp.metrics()["baseline"])
    assert len(adaptations) == 1


def test_compare_takes_the_adapter_and_gives_the_same_comparison(toy, task, adaptations):
    opts = {
        "shots": 4,
        "max_queries": 8,
        "lr_grid": [0.1],
        "control": False,
        "n_resamples": 20,
        "progress": False,
    }
    from_model = il.compare(toy, task, **opts)
    adapter = il.adapt(toy)
    before = len(adaptations)
    from_adapter = il.compare(adapter, task, **opts)
    assert len(adaptations) == before
    cols = ["metric", "variant", "baseline", "layer", "head", "value"]
    assert from_model.metrics()[cols].equals(from_adapter.metrics()[cols])
    assert from_model.accuracy == from_adapter.accuracy


def test_public_functions_take_an_adapter(toy, task):
    adapter = il.adapt(toy)
    prompt = il.icl_prompt(adapter, task, shots=3, seed=2)
    assert torch.equal(prompt.tokens, il.icl_prompt(toy, task, shots=3, seed=2).tokens)

    dec_model, dec_adapter = il.decompose(toy, prompt), il.decompose(adapter, prompt)
    assert torch.equal(dec_model.icl, dec_adapter.icl)
    assert torch.equal(dec_model.zsl, dec_adapter.zsl)

    spec = task.spec
    assert torch.equal(predict(toy, [prompt], spec).scores, predict(adapter, [prompt], spec).scores)

    labels = label_tokens(toy.tokenizer, spec)
    queries = [prompt.query_tokens]
    a = il.record(toy, prompt.prefix, queries, labels, progress=False)
    b = il.record(adapter, prompt.prefix, queries, labels, progress=False)
    assert torch.equal(a.attn_out, b.attn_out)

    ft_model = il.finetune(toy, prompt, lr=0.1)
    ft_adapter = il.finetune(adapter, prompt, lr=0.1)
    assert torch.equal(ft_model.losses, ft_adapter.losses)

    ac_model = attention_comparison(toy, prompt, layer=1, ft_model=ft_model.model)
    ac_adapter = attention_comparison(adapter, prompt, layer=1, ft_model=ft_adapter.model)
    assert ac_model.patterns == ac_adapter.patterns

    control = untrained_copy(adapter, seed=3)
    assert isinstance(control, type(toy))
    same = untrained_copy(toy, seed=3)
    for (_, p), (_, q) in zip(control.named_parameters(), same.named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_with_model_keeps_the_facts_and_swaps_the_model(toy):
    adapter = il.adapt(toy)
    copy = untrained_copy(toy, seed=0)
    other = adapter.with_model(copy)
    assert other.model is copy and adapter.model is toy
    assert (other.n_layers, other.n_heads, other.d_head, other.line) == (
        adapter.n_layers,
        adapter.n_heads,
        adapter.d_head,
        adapter.line,
    )
