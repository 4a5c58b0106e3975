"""The duality decomposition against an independent recomputation, on three
architectures (GPT-2, GPT-NeoX with partial rotary, Llama with grouped-query attention),
on whichever TransformerLens line is installed."""

import pytest
import torch

import icl_lens as il
from tests.models import ARCHITECTURES, ROTARY_FRACTION, make_model, make_tokenizer

TOL = 1e-5


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request):
    model, _ = make_model(request.param)
    return request.param, model


@pytest.fixture(scope="module")
def prompt():
    demos = [
        "Sentence: w1 w2 w3 Label: good",
        "Sentence: w4 w5 Label: bad",
        "Sentence: w6 Label: good",
    ]
    return il.build_prompt(make_tokenizer(), demos, "Sentence: w7 w8 Label:", separator=" \n")


def _ln_weights(norm):
    params = dict(norm.named_parameters())
    weight = next(v for k, v in params.items() if k.split(".")[-1] in ("w", "weight"))
    bias = next((v for k, v in params.items() if k.split(".")[-1] in ("b", "bias")), None)
    return weight.detach(), None if bias is None else bias.detach()


def _rotary(x, positions, rot_dim, base):
    """Rotate-half rotary embedding from its definition (not the model's code)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([x_rot * cos[:, None] + rotated * sin[:, None], x_pass], -1)


def independent_relaxed(model, prompt, layer, position, arch):
    """sum_j v_j (k_j . q) from the weights and the residual stream alone."""
    adapter = il.adapt(model)
    _, cache = model.run_with_cache(prompt.tokens[None])
    resid = cache[f"blocks.{layer}.hook_resid_pre"][0].detach()
    weight, bias = _ln_weights(model.blocks[layer].ln1)
    eps = model.cfg.eps
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = resid - resid.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        x = resid / (resid.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    x = x * weight + (0 if bias is None else bias)
    attn = model.blocks[layer].attn

    def project(W, b, n):
        W = W.detach()
        if W.shape[0] != n:  # the bridge keeps GQA K/V at n_kv heads
            W, b = W.repeat_interleave(n // W.shape[0], 0), b.repeat_interleave(n // b.shape[0], 0)
        return torch.einsum("pm,hmd->phd", x, W) + b.detach()

    n = adapter.n_heads
    zeros = torch.zeros(n, adapter.d_head)
    b = {name: getattr(attn, name, None) for name in ("b_Q", "b_K", "b_V")}
    b = {k: zeros if v is None else v for k, v in b.items()}
    q, k, v = (
        project(getattr(attn, W), b[bn], n) for W, bn in zip(("W_Q", "W_K", "W_V"), b, strict=True)
    )
    if adapter.rotary:
        rot_dim = round(adapter.d_head * ROTARY_FRACTION[arch])
        base = getattr(model.cfg, "rotary_base", 10000)
        pos = torch.arange(prompt.n_tokens)
        q, k = _rotary(q, pos, rot_dim, base), _rotary(k, pos, rot_dim, base)
    scores = torch.einsum("hd,phd->hp", q[position], k[: position + 1])
    return torch.einsum("hp,phd->hd", scores, v[: position + 1])


def test_zsl_plus_icl_equals_relaxed_attention_recomputed_from_weights(arch_model, prompt):
    arch, model = arch_model
    dec = il.decompose(model, prompt)
    for layer in range(il.adapt(model).n_layers):
        expected = independent_relaxed(model, prompt, layer, prompt.prediction_position, arch)
        got = dec.zsl[layer, :, 0] + dec.icl[layer, :, 0]
        assert rel_err(got, expected) <= TOL, (arch, layer)
        for head in range(got.shape[0]):
            assert rel_err(got[head], expected[head]) <= TOL, (arch, layer, head)


def test_softmax_split_reproduces_hook_z(arch_model, prompt):
    _, model = arch_model
    dec = il.decompose(model, prompt, positions=range(prompt.query_start, prompt.n_tokens))
    assert rel_err(dec.z_split, dec.z) <= TOL
    for layer in range(dec.z.shape[0]):
        for head in range(dec.z.shape[1]):
            assert rel_err(dec.z_split[layer, head], dec.z[layer, head]) <= TOL
    assert ((dec.demo_mass > 0) & (dec.demo_mass < 1)).all()


def test_head_outputs_through_W_O_sum_to_attn_out(arch_model, prompt):
    _, model = arch_model
    dec = il.decompose(model, prompt)
    total = dec.head_outputs.sum(1) + dec.b_O[:, None]
    for layer in range(total.shape[0]):
        assert rel_err(total[layer], dec.attn_out[layer]) <= TOL


def test_contributions_sum_to_icl_term_and_matrices_agree(arch_model, prompt):
    _, model = arch_model
    dec = il.decompose(model, prompt, matrices=True)
    q = torch.zeros(0)
    for layer in range(dec.icl.shape[0]):
        for head in range(dec.icl.shape[1]):
            contrib = dec.contributions(layer, head)
            assert contrib.shape[0] == int(prompt.demo_mask.sum())
            assert rel_err(contrib.sum(0), dec.icl[layer, head, 0]) <= TOL
    # matrix form: (W_ZSL + dW_ICL) q equals the vector form; recover q from the capture
    adapter = il.adapt(model)
    cap = il.hooks.Capture(adapter, what={"q"})
    with adapter.inference():
        cap.run(prompt.tokens[None], positions=torch.tensor([[prompt.prediction_position]]))
    for layer in range(dec.icl.shape[0]):
        q = cap.values["q", layer][0, 0]  # head d_head
        via_matrix = torch.einsum("had,hd->ha", dec.dW_ICL[layer], q)
        assert rel_err(via_matrix, dec.icl[layer, :, 0]) <= TOL
        via_matrix = torch.einsum("had,hd->ha", dec.W_ZSL[layer, :, 0], q)
        assert rel_err(via_matrix, dec.zsl[layer, :, 0]) <= TOL


def test_frame_has_one_row_per_layer_head_position(arch_model, prompt):
    _, model = arch_model
    a = il.adapt(model)
    frame = il.decompose(model, prompt, label_tokens=(96, 95)).to_frame()
    assert len(frame) == a.n_layers * a.n_heads
    assert frame[["icl_norm_ratio", "relax_cos", "icl_effect"]].notna().all().all()
    assert (frame["position"] == prompt.prediction_position).all()


def test_label_effects_add_up_to_the_head_effect(arch_model, prompt):
    _, model = arch_model
    dec = il.decompose(model, prompt, label_tokens=(96, 95))
    frame = dec.to_frame()
    # effects are linear: per-token effects sum to the relaxed ZSL + ICL effect
    for layer, head in [(0, 0), (1, 3)]:
        total = dec.token_effects(layer, head).sum().item()
        row = frame[(frame["layer"] == layer) & (frame["head"] == head)].iloc[0]
        assert total == pytest.approx(row.zsl_effect + row.icl_effect, rel=1e-4, abs=1e-7)


def test_dual_form_of_gradient_descent_on_a_linear_layer():
    """W' x = W0 x + sum_i e_i (x_i . x) after plain SGD (method.md section 2)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4, bias=False)
    W0 = layer.weight.detach().clone()
    lr = 0.1
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    inputs, errors = torch.randn(5, 6), []
    targets = torch.randn(5, 4)
    for x_i, t_i in zip(inputs, targets, strict=True):
        y = layer(x_i)
        y.retain_grad()
        loss = ((y - t_i) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        errors.append(-lr * y.grad.detach().clone())
        opt.step()
    x = torch.randn(6)
    dual = W0 @ x + sum(e * (x_i @ x) for e, x_i in zip(errors, inputs, strict=True))
    assert rel_err(layer.weight.detach() @ x, dual) <= TOL
