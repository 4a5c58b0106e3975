"""The FT baseline: K/V-only plain SGD, one epoch in ICL order, the caller's model
untouched, training-token query vectors recorded just before each update, the dual
form of method.md section 2, learning-rate grid and divergence."""

from __future__ import annotations

import pytest
import torch
from icl_lens.hooks import Capture
from icl_lens.hooks.kv_taps import kv_inputs

import icl_lens as il
from icl_lens.model.copying import copy_model
from icl_lens.study.finetune import finetune, training_sequences, training_token_scores
from icl_lens.study.lr_search import PAPER_LR_GRID, LrTrial, lr_grid, search_lr, select_lr
from icl_lens.study.measure import kendall_inputs
from icl_lens.study.predict import label_tokens, predict_queries
from icl_lens.study.records import record
from tests.models import make_model

DEMOS = ["Sentence: w1 w2 Label: good", "Sentence: w50 Label: bad", "Sentence: w3 w4 Label: good"]


@pytest.fixture(scope="module")
def gpt2():
    """A two-layer random-init GPT-2 (finetune never modifies it: shared)."""
    return make_model("gpt2")[0]


@pytest.fixture(scope="module")
def gpt2_one_layer():
    return make_model("gpt2", n_layers=1)[0]


def _prompt(model, query="Sentence: w5 w60 Label:"):
    return il.build_prompt(model.tokenizer, DEMOS, query, separator=" \n")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _capture(model, tokens, what):
    adapter = il.adapt(model)
    cap = Capture(adapter, what=what)
    with adapter.inference():
        cap.run(tokens[None])
    return cap.values


# ---- grid ----------------------------------------------------------------------------


def test_lr_grid_is_the_papers_and_parses_user_grids():
    expected = sorted(m * 10.0**-e for m in range(1, 10) for e in (1, 2, 3, 4))
    assert len(PAPER_LR_GRID) == 36
    assert list(PAPER_LR_GRID) == pytest.approx(expected, rel=1e-12)
    assert lr_grid("short") == (1e-4, 1e-3, 1e-2, 1e-1)
    assert lr_grid("1e-3, 0.5") == (1e-3, 0.5)
    with pytest.raises(ValueError, match="learning-rate grid"):
        lr_grid("fast")
    with pytest.raises(ValueError, match="positive"):
        lr_grid([0.1, -1.0])


def test_select_lr_prefers_accuracy_then_the_smaller_lr_and_skips_diverged():
    trials = [
        LrTrial(0.5, 0.75, -2.0, False, [1.0]),
        LrTrial(0.1, 0.75, -3.0, False, [1.0]),
        LrTrial(0.9, None, None, True, [float("nan")], 0),
        LrTrial(0.01, 0.5, -0.1, False, [1.0]),
    ]
    assert select_lr(trials).lr == 0.1
    with pytest.raises(ValueError, match="every learning rate of the grid diverged"):
        select_lr([trials[2]])


# ---- what trains, and the caller's model ----------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_only_kv_parameters_change_and_the_callers_model_is_bitwise_unchanged(arch, gpt2):
    model = gpt2 if arch == "gpt2" else make_model(arch)[0]
    adapter = il.adapt(model)
    was_training = model.training
    model.train()  # the caller's mode must come back as it was
    before = _state(model)
    ft = finetune(model, _prompt(model), lr=0.5)

    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "caller's model changed"
    assert model.training
    model.train(was_training)
    assert all(p.grad is None for p in model.parameters())
    # nothing of the training pass leaks into the caller's modules (TL 4.3 bridge blocks
    # capture activations through hooks that deepcopy would leave pointing at the original)
    for module in model.modules():
        for value in vars(module).values():
            assert not (isinstance(value, torch.Tensor) and value.grad_fn is not None)

    kv_orig = dict(adapter.kv_parameters())
    kv_ft = dict(adapter.kv_parameters(ft.model))
    assert kv_orig.keys() == kv_ft.keys()
    changed = [n for n in kv_orig if not torch.equal(kv_orig[n], kv_ft[n])]
    weights = [n for n in kv_orig if "bias" not in n and ".b_" not in n and "._b_" not in n]
    assert set(weights) <= set(changed), "every K/V weight should move"
    # undo exactly the K/V update: every other tensor must already be bitwise equal
    with torch.no_grad():
        for name, p in adapter.kv_parameters(ft.model):
            p.copy_(kv_orig[name])
    restored = _state(ft.model)
    assert all(torch.equal(before[k], restored[k]) for k in before)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_one_epoch_of_plain_sgd_in_icl_order_matches_a_hand_written_loop(arch, gpt2):
    model = gpt2 if arch == "gpt2" else make_model(arch)[0]
    prompt = _prompt(model)
    lr = 0.3
    ft = finetune(model, prompt, lr=lr)

    ref = copy_model(model)
    adapter = il.adapt(ref)
    params = [p for _, p in adapter.kv_parameters(ref)]
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    ref.eval()
    seqs = training_sequences(prompt)
    assert [s[0].item() for s in seqs] == [prompt.tokens[0].item()] * 3  # BOS first
    assert torch.equal(torch.cat([s[1:] for s in seqs]), prompt.prefix[1:])  # ICL order
    losses = []
    for seq in seqs:  # batch 1, one epoch, LM loss over every token of the demonstration
        opt.zero_grad()
        logits = ref(seq[None])
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], seq[1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert ft.losses.tolist() == pytest.approx(losses, abs=1e-6)
    trained = dict(adapter.kv_parameters(ft.model))
    for name, p in adapter.kv_parameters(ref):
        torch.testing.assert_close(p, trained[name], rtol=0, atol=1e-6, msg=name)


# ---- divergence ------------------------------------------------------------------------


def test_a_diverging_lr_is_marked_and_the_grid_continues(gpt2_one_layer):
    model = gpt2_one_layer
    prompt = _prompt(model)
    ft = finetune(model, prompt, lr=1e300)  # the update overflows float32
    assert ft.diverged and ft.diverged_at == 0

    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"))
    labels = label_tokens(model.tokenizer, spec)
    queries = [torch.tensor([92, 6, 93]), torch.tensor([92, 70, 93])]
    bos = prompt.tokens[:1]

    def evaluate(m):
        return predict_queries(m, bos, queries, labels, gold=[1, 0])

    best, trials = search_lr(model, prompt, evaluate, grid=[1e300, 0.1])
    assert [t.diverged for t in trials] == [True, False]
    assert trials[0].accuracy is None and trials[1].accuracy in (0.0, 0.5, 1.0)
    assert best.lr == 0.1


# ---- training-token queries and the dual form -------------------------------------------


def test_training_token_queries_are_recorded_just_before_each_update(gpt2):
    """Step j's query vectors are those of the model after updates 0..j-1: equal to the
    original model's at step 0, and to a model finetuned on demonstration 0 alone at
    step 1 (in the second layer, which the first layer's K/V update reaches)."""
    model = gpt2
    seqs = training_sequences(_prompt(model))
    ft = finetune(model, seqs, lr=2.0)
    assert ft.train_queries.shape == (sum(len(s) - 1 for s in seqs), 2, 4, 8)

    q0 = _capture(model, seqs[0], {"q"})
    for layer in range(2):
        torch.testing.assert_close(ft.steps[0].queries[:, layer], q0["q", layer][0, 1:])

    after_one = finetune(model, seqs[:1], lr=2.0).model
    q1 = _capture(after_one, seqs[1], {"q"})
    q1_orig = _capture(model, seqs[1], {"q"})
    torch.testing.assert_close(ft.steps[1].queries[:, 1], q1["q", 1][0, 1:])
    assert not torch.allclose(ft.steps[1].queries[:, 1], q1_orig["q", 1][0, 1:], atol=1e-4)


def test_dual_form_on_a_one_layer_model(gpt2_one_layer):
    """method.md section 2 on the real FT of a one-layer model.

    (1) Exact identity: FT's key/value projections of any input x equal the original
        ones plus linear attention over the recorded training inputs x_t with the
        recorded errors e_t as values, sum_t e_t (x_t . x + 1).
    (2) The Kendall path's FT "attention to training tokens" is q_FT . q_t with q_t the
        recorded training-token query vectors. In one layer W_Q is frozen and x does not
        depend on K/V, so q_FT = q_ZSL = W_Q x + b_Q and q_t = W_Q x_t + b_Q: the scores
        are the dual form's query-key products x_t . x seen through the frozen W_Q.
    """
    model = gpt2_one_layer
    prompt = _prompt(model)
    ft = finetune(model, prompt, lr=3.0, record_inputs=True)
    assert ft.kv_bias and not ft.diverged

    # (1) the dual form of the K/V projections at the validation prompt's tokens
    query = torch.cat([prompt.tokens[:1], prompt.query_tokens])  # the ZSL prompt
    x = kv_inputs(model, query)[0]
    torch.testing.assert_close(kv_inputs(ft.model, query)[0], x)  # one layer: x unchanged
    dk, dv = ft.dual_update(0, x)
    before, after = _capture(model, query, {"k", "v"}), _capture(ft.model, query, {"k", "v"})
    for name, d in (("k", dk), ("v", dv)):
        change = (after[name, 0][0] - before[name, 0][0]).double()
        assert change.abs().max() > 1e-3, "the update should be far from zero"
        torch.testing.assert_close(change, d, rtol=1e-4, atol=1e-6)
    # the recorded inputs are those the model computes for the training sequences
    seqs = training_sequences(prompt)
    for step, seq in zip(ft.steps, seqs, strict=True):
        torch.testing.assert_close(step.inputs[0], kv_inputs(model, seq)[0])

    # (2) the Kendall scores of the pipeline
    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"))
    labels = label_tokens(model.tokenizer, spec)
    queries = [prompt.query_tokens, torch.tensor([92, 7, 8, 93])]
    zsl = record(model, prompt.tokens[:1], queries, labels)
    icl = record(model, prompt.prefix, queries, labels)
    ft_rec = record(ft.model, prompt.tokens[:1], queries, labels)
    torch.testing.assert_close(ft_rec.q, zsl.q)  # W_Q frozen, x unchanged
    icl_scores, ft_scores = kendall_inputs(icl, ft_rec, ft.train_queries)
    assert icl_scores.shape == ft_scores.shape == (2, 1, prompt.query_start - 1)

    W_Q, b_Q = model.blocks[0].attn.W_Q.detach(), model.blocks[0].attn.b_Q.detach()
    x_train = torch.cat([kv_inputs(model, s)[0, 1:] for s in seqs])  # BOS excluded
    q_train = torch.einsum("tm,hmd->thd", x_train, W_Q) + b_Q
    torch.testing.assert_close(ft.train_queries[:, 0], q_train, rtol=1e-4, atol=1e-5)
    for n, q in enumerate(queries):
        xq = kv_inputs(model, torch.cat([prompt.tokens[:1], q]))[0, -1]
        q_ft = torch.einsum("m,hmd->hd", xq, W_Q) + b_Q
        by_hand = torch.einsum("hd,thd->t", q_ft, q_train)
        torch.testing.assert_close(ft_scores[n, 0], by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        training_token_scores(ft_rec.q, ft.train_queries), ft_scores, rtol=0, atol=0
    )


# ---- layer-causal FT (Deutch et al. 2024) --------------------------------------------


def _kv(model) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in il.adapt(model).kv_parameters(model)]


def _per_layer(model, tensors) -> dict[int, list[torch.Tensor]]:
    names = [n for n, _ in il.adapt(model).kv_parameters(model)]
    out: dict[int, list[torch.Tensor]] = {}
    for name, t in zip(names, tensors, strict=True):
        out.setdefault(int(name.split(".")[1]), []).append(t)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layer_causal_updates_do_not_depend_on_the_layers_above(arch):
    """Layer-causal: layer l learns only from its own prediction through itself, so
    changing every weight above layer 0 leaves layer 0's trained K/V exactly as they
    were (over all steps, since layer 0's inputs come from below). Standard FT
    back-propagates through the layers above: its layer-0 update changes."""
    model, _ = make_model(arch, n_layers=3)
    other = copy_model(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in list(other.blocks)[1:]:
            for p in block.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    prompt = _prompt(model)
    results = {}
    for mode in ("layer_causal", "standard"):
        for name, m in (("model", model), ("other", other)):
            ft = finetune(m, prompt, lr=3.0, mode=mode, record_queries=False)
            assert not ft.diverged
            results[mode, name] = _per_layer(m, _kv(ft.model))
    base = _per_layer(model, _kv(model))
    lc_model, lc_other = results["layer_causal", "model"][0], results["layer_causal", "other"][0]
    # layer 0 did learn (its key bias cannot: softmax ignores a shift shared by all keys)
    assert max((a - w).abs().max() for a, w in zip(lc_model, base[0], strict=True)) > 1e-3
    for a, b in zip(lc_model, lc_other, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    st_model, st_other = results["standard", "model"][0], results["standard", "other"][0]
    changed = [not torch.allclose(a, b, atol=1e-4) for a, b in zip(st_model, st_other, strict=True)]
    assert any(changed)


def test_layer_causal_equals_standard_where_it_must():
    """With one step the top layer's gradient is the same in both modes (the other
    layers' losses do not reach it, and its input is the same before any update), while
    a lower layer's differs; on a one-layer model the two modes are the same training."""
    model, _ = make_model("gpt2", n_layers=2)
    prompt = il.build_prompt(model.tokenizer, DEMOS[:1], "Sentence: w5 Label:", separator=" \n")
    lc = _per_layer(model, _kv(finetune(model, prompt, lr=3.0, mode="layer_causal").model))
    st = _per_layer(model, _kv(finetune(model, prompt, lr=3.0).model))
    for a, b in zip(lc[1], st[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(lc[0], st[0], strict=True))
    one, _ = make_model("gpt2", n_layers=1)
    lc = finetune(one, _prompt(one), lr=3.0, mode="layer_causal")
    st = finetune(one, _prompt(one), lr=3.0)
    torch.testing.assert_close(lc.losses, st.losses, rtol=0, atol=0)
    for a, b in zip(_kv(lc.model), _kv(st.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layer_causal_loss_sums_every_layers_lens_loss():
    """The first step's loss is the sum over layers of the LM loss of each layer's
    output through the final norm and unembedding (as Deutch et al.'s --per-layer 1)."""
    model, _ = make_model("neox", n_layers=2)
    prompt = _prompt(model)
    ft = finetune(model, prompt, lr=1e-3, mode="layer_causal", record_queries=False)
    seq = training_sequences(prompt)[0][None]
    adapter = il.adapt(model)
    kept = {}

    def keep(layer):
        def hook(x, hook):
            kept[layer] = x

        return hook

    ce = torch.nn.functional.cross_entropy
    with adapter.inference():
        hooks = [(adapter.name(la, "resid_post"), keep(la)) for la in (0, 1)]
        adapter.forward(seq, fwd_hooks=hooks)
        total = sum(ce(adapter.unembed_residual(kept[la])[0, :-1], seq[0, 1:]) for la in (0, 1))
    assert ft.losses[0].item() == pytest.approx(total.item(), rel=1e-5)


def test_dual_form_holds_for_layer_causal_training():
    """The dual form is an identity of any gradient step on a linear map: it holds for
    the layer-causal loss too, in every layer."""
    model, _ = make_model("gpt2", n_layers=2)
    prompt = _prompt(model)
    ft = finetune(model, prompt, lr=3.0, mode="layer_causal", record_inputs=True)
    query = torch.cat([prompt.tokens[:1], prompt.query_tokens])
    x = kv_inputs(ft.model, query)
    before, after = _capture(model, query, {"k", "v"}), _capture(ft.model, query, {"k", "v"})
    x_before = kv_inputs(model, query)
    torch.testing.assert_close(x[0], x_before[0])  # layer 0's input does not depend on K/V
    dk, dv = ft.dual_update(0, x[0])
    for name, d in (("k", dk), ("v", dv)):
        change = (after[name, 0][0] - before[name, 0][0]).double()
        assert change.abs().max() > 1e-3
        torch.testing.assert_close(change, d, rtol=1e-4, atol=1e-6)


def test_unknown_ft_mode_is_refused(gpt2_one_layer):
    with pytest.raises(ValueError, match="unknown FT mode"):
        finetune(gpt2_one_layer, _prompt(gpt2_one_layer), lr=0.1, mode="causal")
