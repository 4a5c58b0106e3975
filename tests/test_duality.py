"""The duality decomposition against an independent recomputation, on four
architectures (GPT-2, GPT-NeoX with partial rotary, Llama with grouped-query attention,
Gemma 3 with QK-norm, sliding-window layers shorter than the prompt and its own query
scaling), on whichever TransformerLens line is installed. The identities are checked on
every layer and on layer subsets: ``layers=[1, 2]`` and ``layers=[2]`` give exactly the
full decomposition's terms of those layers, looked up by the model's layer numbers."""

import pytest
import torch

import icl_lens as il
from tests.models import (
    ARCHITECTURES,
    GEMMA3_WINDOW,
    ROTARY_FRACTION,
    make_model,
    make_tokenizer,
)
from tests.reference import gemma3_reference, rotary

TOL = 1e-5
HF_TWINS = {}  # arch -> the transformers model the hooked one wraps
N_LAYERS = 3
LAYER_SETS = [None, [1, 2], [2]]
"""Every layer, and two subsets that leave layer 0 (and 1) out: a term looked up by
position in ``layers`` instead of by layer number shows as another layer's."""


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_model(request):
    model, HF_TWINS[request.param] = make_model(request.param, n_layers=N_LAYERS)
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


def independent_relaxed(model, prompt, layer, position, arch):
    """sum_j v_j (k_j . q) from the weights and the residual stream alone."""
    if arch == "gemma3":
        zsl, icl, _ = gemma3_reference(HF_TWINS[arch], prompt.tokens, prompt.demo_mask, [position])
        return (zsl + icl)[layer, :, 0]
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
        q, k = rotary(q, pos, rot_dim, base), rotary(k, pos, rot_dim, base)
    scores = torch.einsum("hd,phd->hp", q[position], k[: position + 1])
    return torch.einsum("hp,phd->hd", scores, v[: position + 1])


def decomposed_layers(dec) -> list[tuple[int, int]]:
    """(the model's layer number, its index on the tensors' layer axis)."""
    return [(layer, dec.index_of(layer, 0)[0]) for layer in dec.layers.tolist()]


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_zsl_plus_icl_equals_relaxed_attention_recomputed_from_weights(arch_model, prompt, layers):
    arch, model = arch_model
    dec = il.decompose(model, prompt, layers=layers)
    assert dec.layers.tolist() == (layers or list(range(N_LAYERS)))
    for layer, li in decomposed_layers(dec):
        expected = independent_relaxed(model, prompt, layer, prompt.prediction_position, arch)
        got = dec.zsl[li, :, 0] + dec.icl[li, :, 0]
        assert rel_err(got, expected) <= TOL, (arch, layer)
        for head in range(got.shape[0]):
            assert rel_err(got[head], expected[head]) <= TOL, (arch, layer, head)


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_softmax_split_reproduces_hook_z(arch_model, prompt, layers):
    _, model = arch_model
    positions = range(prompt.query_start, prompt.n_tokens)
    dec = il.decompose(model, prompt, positions=positions, layers=layers)
    assert rel_err(dec.z_split, dec.z) <= TOL
    for layer in range(dec.z.shape[0]):
        for head in range(dec.z.shape[1]):
            assert rel_err(dec.z_split[layer, head], dec.z[layer, head]) <= TOL
    assert ((dec.demo_mass > 0) & (dec.demo_mass < 1)).all()


def test_gemma3_terms_and_softmax_output_against_a_from_scratch_reference(prompt):
    """Every layer (local and global) at every query position; the prompt is longer
    than the window, so the local layers' terms leave out the early tokens."""
    model, hf = make_model("gemma3")
    positions = range(prompt.query_start, prompt.n_tokens)
    dec = il.decompose(model, prompt, positions=positions)
    zsl, icl, z = gemma3_reference(hf, prompt.tokens, prompt.demo_mask, positions)
    for layer in range(hf.config.num_hidden_layers):
        for n, position in enumerate(positions):
            assert rel_err(dec.zsl[layer, :, n], zsl[layer, :, n]) <= TOL, (layer, position)
            assert rel_err(dec.icl[layer, :, n], icl[layer, :, n]) <= TOL, (layer, position)
            assert rel_err(dec.z[layer, :, n], z[layer, :, n]) <= TOL, (layer, position)


def test_gemma3_demonstrations_outside_a_local_window_contribute_nothing(prompt):
    model, hf = make_model("gemma3")
    dec = il.decompose(model, prompt, matrices=True)
    position = prompt.prediction_position
    demo_positions = prompt.demo_mask.nonzero()[:, 0]
    outside = position - demo_positions >= GEMMA3_WINDOW
    assert outside.any() and (~outside).any()  # the prompt straddles the window
    for layer, kind in enumerate(hf.config.layer_types):
        seen = dec.visible[layer, :, 0][:, prompt.demo_mask]  # head demo
        for head in range(dec.icl.shape[1]):
            contrib = dec.contributions(layer, head).norm(dim=-1)
            if kind == "sliding_attention":
                assert torch.equal(seen[head], ~outside)
                assert (contrib[outside] == 0).all() and (contrib[~outside] > 0).all()
            else:
                assert seen[head].all() and (contrib > 0).all()
        # BOS sits outside the window too: the zero-shot term loses it on local layers
        assert dec.visible[layer, :, 0, 0].all() == (kind == "full_attention")
        # the matrix form sums over the visible demonstrations only
        in_window = prompt.demo_mask & dec.visible[layer, 0, 0]
        v, k = dec.values[layer, :, in_window], _keys(model, prompt, layer)[:, in_window]
        assert rel_err(dec.dW_ICL[layer, :, 0], torch.einsum("hpa,hpb->hab", v, k)) <= TOL


def _keys(model, prompt, layer):
    """The post-rotary keys of ``layer``, expanded to query heads: head pos d_head."""
    adapter = il.adapt(model)
    cap = il.hooks.Capture(adapter, what={"k"}, layers=[layer])
    with adapter.inference():
        cap.run(prompt.tokens[None])
    return cap.values["k", layer][0].transpose(0, 1).repeat_interleave(adapter.group_size, 0)


def test_key_dot_query_times_the_model_scale_is_its_attention_score(arch_model, prompt):
    """q and k are the ones in the model's dot product (after QK-norm and rotary);
    score_scale is its own factor (Gemma: 1/sqrt(query_pre_attn_scalar))."""
    _, model = arch_model
    adapter = il.adapt(model)
    dec = il.decompose(model, prompt)
    cap = il.hooks.Capture(adapter, what={"scores"})
    with adapter.inference():
        cap.run(prompt.tokens[None], positions=torch.tensor([[prompt.prediction_position]]))
    for layer in range(adapter.n_layers):
        scores = cap.values["scores", layer][0, 0]  # head key_pos
        seen = dec.visible[layer, :, 0]
        got = dec.key_dot_query[layer, :, 0] * dec.score_scale[layer]
        assert torch.equal(seen, scores > -1e30)
        assert rel_err(got[seen], scores[seen]) <= TOL
        assert (dec.key_dot_query[layer, :, 0][~seen] == 0).all()


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_head_outputs_through_W_O_sum_to_attn_out(arch_model, prompt, layers):
    """Through W_O (and Gemma's post-attention norm, frozen at this forward) the heads'
    outputs add up to hook_attn_out, what the block adds to the residual stream; so do
    the heads of one layer mapped one by one (head_to_resid, by layer number)."""
    arch, model = arch_model
    dec = il.decompose(model, prompt, layers=layers)
    bias = dec.b_O[:, None]
    assert (dec.post_norm is not None) == (arch == "gemma3")
    if dec.post_norm is not None:
        bias = bias * dec.post_norm
    total = dec.head_outputs.sum(1) + bias
    for layer, li in decomposed_layers(dec):
        assert rel_err(total[li], dec.attn_out[li]) <= TOL
        n_heads = dec.z.shape[1]
        heads = sum(dec.head_to_resid(layer, h, 0, dec.z[li, h, 0]) for h in range(n_heads))
        assert rel_err(heads + bias[li, 0], dec.attn_out[li, 0]) <= TOL


def test_label_direction_reads_the_logit_difference_off_the_residual_stream(arch_model, prompt):
    """The direction is direct logit attribution's: dotted with the final residual
    stream (plus the constant the final norm's and unembedding's biases add) it gives
    the model's logit difference, Gemma's 1 + w norm weight included."""
    _, model = arch_model
    adapter = il.adapt(model)
    a, b = 96, 95
    dec = il.decompose(model, prompt, label_tokens=(a, b))
    p = prompt.prediction_position
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompt.tokens[None])
    resid = cache[f"blocks.{adapter.n_layers - 1}.hook_resid_post"][0, p]
    W_U = model.W_U.detach()
    constant = 0.0
    params = model.ln_final.named_parameters()
    bias = next((x for name, x in params if name.split(".")[-1] in ("b", "bias")), None)
    if bias is not None:
        constant += float(bias.detach() @ (W_U[:, b] - W_U[:, a]))
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        constant += float(b_U.detach()[b] - b_U.detach()[a])
    got = float(resid @ dec.label_direction[-1, 0]) + constant
    assert got == pytest.approx(float(logits[0, p, b] - logits[0, p, a]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("layers", LAYER_SETS)
def test_contributions_sum_to_icl_term_and_matrices_agree(arch_model, prompt, layers):
    _, model = arch_model
    dec = il.decompose(model, prompt, matrices=True, layers=layers)
    for layer, li in decomposed_layers(dec):
        for head in range(dec.icl.shape[1]):
            contrib = dec.contributions(layer, head)
            assert contrib.shape[0] == int(prompt.demo_mask.sum())
            assert rel_err(contrib.sum(0), dec.icl[li, head, 0]) <= TOL
    # matrix form: (W_ZSL + dW_ICL) q equals the vector form; recover q from the capture
    adapter = il.adapt(model)
    cap = il.hooks.Capture(adapter, what={"q"})
    with adapter.inference():
        cap.run(prompt.tokens[None], positions=torch.tensor([[prompt.prediction_position]]))
    for layer, li in decomposed_layers(dec):
        q = cap.values["q", layer][0, 0]  # head d_head
        via_matrix = torch.einsum("had,hd->ha", dec.dW_ICL[li, :, 0], q)
        assert rel_err(via_matrix, dec.icl[li, :, 0]) <= TOL
        via_matrix = torch.einsum("had,hd->ha", dec.W_ZSL[li, :, 0], q)
        assert rel_err(via_matrix, dec.zsl[li, :, 0]) <= TOL


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


PER_LAYER = ("zsl", "icl", "z", "key_dot_query", "visible", "pattern", "values", "W_O", "b_O")
PER_LAYER += ("score_scale", "attn_out", "post_norm", "W_ZSL", "dW_ICL", "label_direction")


@pytest.mark.parametrize("layers", [[1, 2], [2], [2, 0]])
def test_a_layer_subset_gives_the_full_decompositions_terms(arch_model, prompt, layers):
    """Issue 20: with ``layers=[1, 2]`` contributions(layer=1) returned layer 2's terms
    (indexed by position in ``layers``), and with ``layers=[2]`` layer 2 raised an
    IndexError. Every method takes the model's layer number; every tensor's layer axis
    follows ``dec.layers``; the frame names the right layers."""
    from icl_lens.views.meta_gradients import meta_gradients

    _, model = arch_model
    kwargs = dict(
        positions=range(prompt.query_start, prompt.n_tokens), matrices=True, label_tokens=(96, 95)
    )
    full = il.decompose(model, prompt, **kwargs)
    sub = il.decompose(model, prompt, layers=layers, **kwargs)
    n_heads, n_pos = full.zsl.shape[1], len(full.positions)
    for layer in layers:
        for head in range(n_heads):
            for n in range(n_pos):
                for method in ("contributions", "token_effects"):
                    got = getattr(sub, method)(layer, head, n)
                    assert rel_err(got, getattr(full, method)(layer, head, n)) <= 1e-6
                x = sub.values[sub.index_of(layer, head, n)[:2]]
                assert (
                    rel_err(
                        sub.head_to_resid(layer, head, n, x), full.head_to_resid(layer, head, n, x)
                    )
                    <= 1e-6
                )
        a, b = meta_gradients(sub, layer, 1, n_pos - 1), meta_gradients(full, layer, 1, n_pos - 1)
        assert a.layer == layer and a.values.keys() == b.values.keys()
        for key in a.values:
            assert a.values[key] == pytest.approx(b.values[key], rel=1e-6, abs=1e-9), key
    assert sub.layers.tolist() == layers
    for name in PER_LAYER:
        if getattr(full, name) is None:  # post_norm: Gemma only
            assert getattr(sub, name) is None, name
            continue
        for li, layer in enumerate(layers):
            got, expected = getattr(sub, name)[li], getattr(full, name)[layer]
            if got.dtype == torch.bool:
                assert torch.equal(got, expected), name
            else:
                assert rel_err(got, expected) <= 1e-6, (name, layer)
    frame = sub.to_frame().set_index(["layer", "head", "position"])
    expected = full.to_frame().set_index(["layer", "head", "position"]).loc[frame.index]
    assert sorted(set(frame.index.get_level_values("layer"))) == sorted(layers)
    numeric = frame.select_dtypes("number").columns
    assert (frame["head_label"] == expected["head_label"]).all()
    assert frame[numeric].to_numpy() == pytest.approx(expected[numeric].to_numpy(), rel=1e-5)


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
