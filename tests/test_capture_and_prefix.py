"""Capture hooks, prefix reuse and the early errors of the foundation."""

import warnings

import icl_lens.hooks.prefix as prefix_module
import pytest
import torch
from icl_lens.hooks import Capture

import icl_lens as il
from tests.models import ARCHITECTURES, make_model, make_tokenizer


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return make_model(request.param)[0]


def _queries():
    tok = make_tokenizer()
    texts = ["Sentence: w7 w8 w9 Label:", "Sentence: w10 Label:", "Sentence: w11 w12 Label:"]
    return [torch.tensor(il.data.prompts.encode(tok, t)) for t in texts]


def _prefix():
    tok = make_tokenizer()
    demos = ["Sentence: w1 w2 Label: good", "Sentence: w3 Label: bad"]
    return il.build_prompt(tok, demos, "w0", separator=" \n").prefix


WHAT = {"q", "k", "v", "z", "scores", "pattern", "attn_out"}


def masked_as_equal(x):
    """Masked scores are -inf on one line and a large negative number on the other."""
    return torch.nan_to_num(x, neginf=-1e4).clamp(min=-1e4)


def test_prefix_reuse_matches_full_forward(model):
    adapter = il.adapt(model)
    prefix, queries = _prefix(), _queries()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure
        cached = il.PrefixRunner(adapter, prefix).run(queries, what=WHAT)
    runner = il.PrefixRunner(adapter, prefix)
    assert runner.path == "cache"
    full = il.PrefixRunner(adapter, prefix, reuse=False).run(queries, what=WHAT)
    for b, n in enumerate(cached.lengths.tolist()):
        assert (cached.logits[b, :n] - full.logits[b, :n]).abs().max() <= 1e-4
    for key, x in full.values.items():
        y = cached.values[key]
        if key[0] in ("k", "v"):
            for b, n in enumerate(cached.lengths.tolist()):
                m = len(prefix) + n
                assert (y[b, :m] - x[b, :m]).abs().max() <= 1e-4, key
        else:
            assert (masked_as_equal(y) - masked_as_equal(x)).abs().max() <= 1e-4, key


def test_batched_capture_equals_one_prompt_at_a_time(model):
    adapter = il.adapt(model)
    prefix, queries = _prefix(), _queries()
    batch = il.PrefixRunner(adapter, prefix).run(queries, what={"pattern", "attn_out", "q"})
    for b, q in enumerate(queries):
        single = Capture(adapter, what={"pattern", "attn_out", "q"})
        tokens = torch.cat([prefix, q])[None]
        with adapter.inference():
            logits = single.run(tokens, positions=torch.tensor([[len(tokens[0]) - 1]]))
        assert (batch.logits[b, len(q) - 1] - logits[0, -1]).abs().max() <= 1e-4
        for key, x in single.values.items():
            y = batch.values[key][b : b + 1]
            if key[0] == "pattern":
                y = y[..., : tokens.shape[1]]
                assert y[..., tokens.shape[1] :].abs().sum() == 0
            assert (y - x).abs().max() <= 1e-4, key


def test_left_padded_batch_with_mask_matches_unpadded(model):
    adapter = il.adapt(model)
    pad = 2
    seqs = [torch.cat([torch.tensor([1]), q]) for q in _queries()]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    positions = torch.full((len(seqs), 1), width - 1)
    kwargs = {"attention_mask": mask}
    if adapter.line == "bridge":  # transformers derives positions from the cache, not the mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = Capture(adapter, what={"attn_out", "z", "q"})
    with adapter.inference():
        batch.run(tokens, positions=positions, **kwargs)
    for i, s in enumerate(seqs):
        single = Capture(adapter, what={"attn_out", "z", "q"})
        with adapter.inference():
            single.run(s[None], positions=torch.tensor([[len(s) - 1]]))
        for key, x in single.values.items():
            assert (batch.values[key][i : i + 1] - x).abs().max() <= 1e-4, key


def test_fallback_when_the_cache_disagrees(monkeypatch):
    model = make_model("gpt2")[0]
    adapter = il.adapt(model)
    prefix, queries = _prefix(), _queries()
    expected = il.PrefixRunner(adapter, prefix, reuse=False).run(queries, what={"attn_out"})
    real = prefix_module._forward_after_prefix

    def broken(*args, **kwargs):  # a cache that silently drops information
        return real(*args, **kwargs) + 0.5

    monkeypatch.setattr(prefix_module, "_forward_after_prefix", broken)
    runner = il.PrefixRunner(adapter, prefix)
    with pytest.warns(RuntimeWarning, match="prefix reuse disabled.*logits"):
        got = runner.run(queries, what={"attn_out"})
    assert runner.path == "full" and "changed logits" in runner.reason
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.values["attn_out", 0], expected.values["attn_out", 0])


def test_fallback_when_the_cache_raises(monkeypatch):
    model = make_model("gpt2")[0]
    adapter = il.adapt(model)

    def no_cache(*args, **kwargs):
        raise RuntimeError("the model returned no key/value cache")

    monkeypatch.setattr(prefix_module, "_prefix_state", no_cache)
    runner = il.PrefixRunner(adapter, _prefix())
    with pytest.warns(RuntimeWarning, match="no key/value cache"):
        runner.run(_queries())
    assert runner.path == "full"


def test_too_long_prompt_names_both_lengths():
    model = make_model("gpt2", n_ctx=32)[0]
    tok = make_tokenizer()
    demos = ["Sentence: " + " ".join(f"w{i}" for i in range(12)) + " Label: good"] * 3
    with pytest.raises(ValueError, match=r"has \d+ tokens .*context is 32"):
        il.build_prompt(tok, demos, "Sentence: w1 Label:", n_ctx=32)
    prompt = il.build_prompt(tok, demos, "Sentence: w1 Label:")
    with pytest.raises(ValueError, match=r"\d+ of BOS and demonstrations.*context is 32"):
        il.decompose(model, prompt)
    with pytest.raises(ValueError, match=r"demonstrations \(\d+ tokens\) \+ query .* 32"):
        il.PrefixRunner(il.adapt(model), prompt.prefix).run([prompt.query_tokens])


def test_position_out_of_range():
    model = make_model("gpt2")[0]
    prompt = il.build_prompt(make_tokenizer(), ["w1 good"], "w2 w3", separator=" \n")
    with pytest.raises(IndexError, match="not query positions"):
        il.decompose(model, prompt, positions=[prompt.n_tokens])
    with pytest.raises(IndexError, match="not query positions"):
        il.decompose(model, prompt, positions=[1])  # a demonstration token
    with pytest.raises(IndexError, match="out of range"):
        il.PrefixRunner(il.adapt(model), prompt.prefix).run([prompt.query_tokens], positions=[[5]])


def test_not_a_hooked_model_is_a_type_error():
    for thing in (object(), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="TransformerBridge.*HookedTransformer"):
            il.adapt(thing)
    with pytest.raises(TypeError, match="load_model"):
        il.decompose(torch.nn.Linear(2, 2), il.build_prompt(make_tokenizer(), [], "w1"))


def test_unknown_capture_target_and_layer():
    adapter = il.adapt(make_model("gpt2")[0])
    with pytest.raises(ValueError, match="unknown capture targets"):
        Capture(adapter, what={"resid"})
    with pytest.raises(ValueError, match="out of range"):
        Capture(adapter, what={"q"}, layers=[5])


def test_the_reuse_check_is_relative_to_each_quantity_and_reads_masks():
    """Gemma's attention outputs reach thousands: a float32 rounding difference of 2e-3
    there is agreement, 1e-3 on a value of order 1 is not; captured scores are -inf
    where masked, and a key masked on one side only is a different mask."""
    adapter = il.adapt(make_model("gpt2")[0])
    lengths = torch.tensor([3])
    big = torch.full((1, 1, 32), 3000.0)
    mask_inf = torch.tensor([[[[0.5, float("-inf"), 0.0]]]])
    nearby = mask_inf + torch.tensor([0.0, 0.0, 1e-5])  # within TOLERANCE
    reference = prefix_module.BatchResult(
        torch.zeros(1, 3, 8), {("attn_out", 0): big, ("scores", 0): mask_inf}, lengths
    )

    def check(attn_out, scores):
        runner = il.PrefixRunner(adapter, torch.tensor([1]))
        got = prefix_module.BatchResult(
            torch.zeros(1, 3, 8), {("attn_out", 0): attn_out, ("scores", 0): scores}, lengths
        )
        return runner._matches(got, reference, lengths, None), runner.reason

    assert check(big + 2e-3, nearby) == (True, "")
    with pytest.warns(RuntimeWarning, match="changed attn_out of layer 0 by 0.5"):
        assert not check(big + 0.5, nearby)[0]
    unmasked = mask_inf.nan_to_num(neginf=-1.0)
    with pytest.warns(RuntimeWarning, match="changed the attention mask of scores of layer 0"):
        assert not check(big, unmasked)[0]


def test_inference_switches_to_eval_only_when_something_trains(monkeypatch):
    model = make_model("gpt2")[0]
    adapter = il.adapt(model)
    model.train()
    with adapter.inference():
        assert not any(m.training for m in model.modules()) and not torch.is_grad_enabled()
    assert all(m.training for m in model.modules())
    model.eval()

    def walk(mode=True):  # eval() and train() walk every module: not needed here
        raise AssertionError("an eval-mode model was switched")

    monkeypatch.setattr(model, "train", walk)
    with adapter.inference():
        assert not torch.is_grad_enabled()
