"""Momentum attention (icl_lens.hooks.momentum) on every TransformerLens backend installed here.

Runs under TransformerLens 3 (HookedTransformer and TransformerBridge) and 4
(TransformerBridge); ``_momentum_models`` picks what the installed version offers.
"""

from __future__ import annotations

import doctest

import icl_lens.hooks.momentum as momentum_module
import pytest
import torch
from icl_lens.hooks.momentum import add_momentum, momentum_handle, momentum_term, remove_momentum

try:  # `python -m pytest` from the repo root puts the root on sys.path ...
    from tests._momentum_models import BOS, MODEL_IDS, TL_MAJOR, build, n_kv_heads
except ModuleNotFoundError:  # ... a bare `pytest` puts tests/ there instead
    from _momentum_models import BOS, MODEL_IDS, TL_MAJOR, build, n_kv_heads

torch.set_num_threads(1)

ETA = torch.tensor([0.2, 0.5, 0.7, 0.95])
ATOL = 1e-5


@pytest.fixture(params=MODEL_IDS)
def model(request):
    return build(request.param)


def _tokens(batch: int = 2, pos: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 100, (batch, pos), generator=gen)
    toks[:, 0] = BOS
    return toks


def _record_pre_momentum_z(model) -> dict[int, torch.Tensor]:
    """A permanent hook on each hook_z, added *before* momentum, so it sees z un-modified."""
    store: dict[int, torch.Tensor] = {}
    for layer in range(model.cfg.n_layers):

        def rec(z, hook, layer=layer):
            store[layer] = z.detach().clone()

        model.add_hook(f"blocks.{layer}.attn.hook_z", rec, is_permanent=True)
    return store


def _loop_reference(z_pre, v, eta, group, mask=None):
    """z_t + sum_{i<t} eta_h^(t-i) v_i, with plain python loops (head h reads kv h // group)."""
    out = z_pre.clone().double()
    batch, pos, n_heads, _ = z_pre.shape
    for b in range(batch):
        for t in range(pos):
            for h in range(n_heads):
                acc = torch.zeros(z_pre.shape[-1], dtype=torch.float64)
                for i in range(t):
                    if mask is not None and mask[b, i] == 0:
                        continue
                    acc += float(eta[h]) ** (t - i) * v[b, i, h // group].double()
                out[b, t, h] += acc
    return out


def _w_o_b_o(model, layer):
    attn = model.blocks[layer].attn
    w_o = attn.W_O.detach()  # [head, d_head, d_model]
    b_o = getattr(attn, "b_O", None)
    b_o = torch.zeros(w_o.shape[-1]) if b_o is None else b_o.detach()
    return w_o, b_o


def test_matches_loop_reference_through_w_o(model):
    toks = _tokens()
    pre = _record_pre_momentum_z(model)
    handle = add_momentum(model, ETA)
    names = lambda n: n.endswith(("attn.hook_z", "attn.hook_v", "hook_attn_out"))  # noqa: E731
    _, cache = model.run_with_cache(toks, names_filter=names)
    group = model.cfg.n_heads // n_kv_heads(model)
    assert cache["blocks.0.attn.hook_v"].shape[2] == n_kv_heads(model)
    for layer in range(model.cfg.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"]
        expected_z = _loop_reference(pre[layer], v, ETA, group)
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert (z - pre[layer]).abs().max() > 1e-3, "momentum made no difference"
        torch.testing.assert_close(z.double(), expected_z, atol=ATOL, rtol=0)
        w_o, b_o = _w_o_b_o(model, layer)
        expected_out = torch.einsum("bphd,hdm->bpm", expected_z, w_o.double()) + b_o.double()
        out = cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(out.double(), expected_out, atol=ATOL, rtol=0)
    handle.remove()


def test_causal(model):
    toks = _tokens()
    later = toks.clone()
    later[:, 5:] = (later[:, 5:] + 7) % 100
    with add_momentum(model, 0.9):
        a, cache_a = model.run_with_cache(toks)
        b, cache_b = model.run_with_cache(later)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_attn_out"
        torch.testing.assert_close(cache_a[name][:, :5], cache_b[name][:, :5], atol=1e-6, rtol=0)


def test_remove_restores_exact_outputs_and_keeps_other_hooks(model):
    toks = _tokens()
    calls = []
    model.add_hook("blocks.1.attn.hook_z", lambda z, hook: calls.append(1), is_permanent=True)
    hook_counts = {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()}
    plain = model(toks)
    handle = add_momentum(model, 0.8, layers=[0, 1])
    assert momentum_handle(model) is handle
    moved = model(toks)
    assert not torch.allclose(moved, plain, atol=1e-4)
    remove_momentum(model)
    assert momentum_handle(model) is None and not handle.active
    assert torch.equal(model(toks), plain)
    assert {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()} == hook_counts
    assert len(calls) == 3  # the other permanent hook fired every time and is still there
    remove_momentum(model)  # idempotent
    handle.remove()
    # adding again after removal gives the same momentum output
    with add_momentum(model, 0.8):
        torch.testing.assert_close(model(toks), moved, atol=0, rtol=0)
    assert torch.equal(model(toks), plain)


def test_survives_reset_hooks_run_with_hooks_and_run_with_cache(model):
    toks = _tokens()
    with add_momentum(model, 0.6):
        moved = model(toks)
        model.reset_hooks()
        assert torch.equal(model(toks), moved)
        seen = []
        hooked = model.run_with_hooks(
            toks, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: seen.append(1))]
        )
        assert seen and torch.equal(hooked, moved)
        cached, _ = model.run_with_cache(toks)
        assert torch.equal(cached, moved)
        assert torch.equal(model(toks), moved)


def test_reset_including_permanent_then_add_again(model):
    toks = _tokens()
    plain = model(toks)
    handle = add_momentum(model, 0.7)
    moved = model(toks)
    model.reset_hooks(including_permanent=True)  # takes momentum off too
    assert not handle.active and momentum_handle(model) is None
    assert torch.equal(model(toks), plain)
    with add_momentum(model, 0.7):
        assert torch.equal(model(toks), moved)
    assert torch.equal(model(toks), plain)


def test_eta_zero_is_exact_identity_and_layer_subset(model):
    toks = _tokens()
    plain, plain_cache = model.run_with_cache(toks)
    with add_momentum(model, 0.0):
        assert torch.equal(model(toks), plain)
    with add_momentum(model, 0.9, layers=[-1]) as handle:
        assert handle.layers == [model.cfg.n_layers - 1]
        _, cache = model.run_with_cache(toks)
    assert torch.equal(cache["blocks.0.hook_attn_out"], plain_cache["blocks.0.hook_attn_out"])
    last = f"blocks.{model.cfg.n_layers - 1}.hook_attn_out"
    assert not torch.allclose(cache[last], plain_cache[last], atol=1e-4)


def test_per_layer_eta_table(model):
    toks = _tokens()
    table = torch.stack([ETA, ETA.flip(0)])
    pre = _record_pre_momentum_z(model)
    with add_momentum(model, table) as handle:
        torch.testing.assert_close(handle.etas(), table)
        _, cache = model.run_with_cache(toks)
    group = model.cfg.n_heads // n_kv_heads(model)
    z1 = cache["blocks.1.attn.hook_z"]
    expected = _loop_reference(pre[1], cache["blocks.1.attn.hook_v"], table[1], group)
    torch.testing.assert_close(z1.double(), expected, atol=ATOL, rtol=0)


def test_learnable_eta_gets_gradients_and_trains(model):
    toks = _tokens()
    with add_momentum(model, ETA) as fixed:
        fixed_logits = model(toks)
    handle = add_momentum(model, ETA, learnable=True)
    params = list(handle.parameters())
    assert len(params) == model.cfg.n_layers and all(p.shape == (4,) for p in params)
    torch.testing.assert_close(handle.etas(), ETA.expand(2, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(model(toks), fixed_logits, atol=1e-5, rtol=0)
    assert fixed.etas().requires_grad is False
    opt = torch.optim.Adam(handle.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(toks, return_type="loss")
        loss.backward()
        losses.append(loss.item())
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < losses[0]
    assert not torch.allclose(handle.etas(), ETA.expand(2, 4))
    assert ((handle.etas() > 0) & (handle.etas() < 1)).all()
    assert set(handle.state_dict()) == {"logits.layer_0", "logits.layer_1"}
    remove_momentum(model)


def test_errors(model):
    with pytest.raises(ValueError, match="eta must be"):
        add_momentum(model, torch.ones(3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        add_momentum(model, 1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        add_momentum(model, 1.0, learnable=True)
    with pytest.raises(ValueError, match="layer"):
        add_momentum(model, 0.5, layers=[5])
    with pytest.raises(TypeError):
        add_momentum(torch.nn.Linear(2, 2), 0.5)
    handle = add_momentum(model, 0.5)
    with pytest.raises(RuntimeError, match="already on"):
        add_momentum(model, 0.5)
    with pytest.raises(KeyError):
        handle.eta(7)
    handle.remove()


def test_attention_mask_zeroes_padded_values(model):
    toks = _tokens()
    mask = torch.ones_like(toks)
    mask[0, :3] = 0  # row 0 left-padded by 3
    pre = _record_pre_momentum_z(model)
    handle = add_momentum(model, ETA)
    with handle.attention_mask(mask):
        _, cache = model.run_with_cache(toks)
    with pytest.raises(ValueError, match="mask shape"), handle.attention_mask(mask[:, :4]):
        model(toks)
    handle.remove()
    group = model.cfg.n_heads // n_kv_heads(model)
    for layer in range(model.cfg.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"]
        expected = _loop_reference(pre[layer], v, ETA, group, mask=mask)
        z = cache[f"blocks.{layer}.attn.hook_z"]
        torch.testing.assert_close(z.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.skipif(TL_MAJOR >= 4, reason="HookedTransformer (and its KV cache) is TL 3 only")
def test_kv_cache_is_refused_not_silently_wrong():
    model = build("hooked-mha")
    toks = _tokens(batch=1, pos=4)
    kwargs = dict(max_new_tokens=3, verbose=False, do_sample=False, stop_at_eos=False)
    with add_momentum(model, 0.5):
        out = model.generate(toks, use_past_kv_cache=False, **kwargs)
        assert out.shape == (1, 7)
        with pytest.raises(RuntimeError, match="key/value cache"):
            model.generate(toks, use_past_kv_cache=True, **kwargs)


def test_momentum_term_matches_loop_gqa():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 6, 2, 5, generator=gen)
    eta = torch.tensor([0.1, 0.4, 0.8, 1.0])
    got = momentum_term(v, eta)
    expected = _loop_reference(torch.zeros(2, 6, 4, 5), v, eta, group=2)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="evenly"):
        momentum_term(torch.randn(1, 3, 3, 2), eta)


def test_docstring_examples_run():
    result = doctest.testmod(momentum_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
