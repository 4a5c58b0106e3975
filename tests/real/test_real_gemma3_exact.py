"""The real Gemma 3 270M: the decomposition identities on a prompt longer than the
local layers' 512-token window, against a from-scratch reference, and prefix reuse
equal to full forwards with a prefix longer than the window."""

import warnings

import pytest
import torch

import icl_lens as il
from tests.reference import gemma3_reference

pytestmark = pytest.mark.real

REL = 1e-4
TEMPLATE = "Review: {text} Sentiment:"
REVIEWS = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the plot is nothing but boilerplate cliches from start to finish .", 0),
    ("an utterly charming and hilarious film that reminded me of why i love movies .", 1),
    ("it 's a bad sign when you 're rooting for the film to end .", 0),
    ("the performances are uniformly excellent , and the story never lets up .", 1),
    ("a tedious , joyless exercise in style over substance .", 0),
    ("smart , funny and surprisingly moving , this is the year 's best comedy .", 1),
    ("even the talented cast cannot save this dull and predictable mess .", 0),
]
QUERIES = ["a warm , affecting film that earns every one of its tears .", "a dreary bore ."]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def prompts(model, n_demos):
    spec = il.TaskSpec("mr", TEMPLATE, (" Negative", " Positive"))
    demos = [il.Example({"text": t}, label=y) for t, y in (REVIEWS * 5)[:n_demos]]
    return [il.task_prompt(model.tokenizer, spec, demos, q) for q in QUERIES]


def window(model):
    return model.original_model.config.sliding_window


def test_identities_on_a_prompt_past_the_sliding_window(gemma3):
    """W_ZSL q, dW_ICL q and z at the prediction position of a 600+-token prompt, every
    layer, within 1e-4 (relative) of Gemma 3's definitions computed from the weights:
    the local layers leave out the demonstrations more than 512 tokens back."""
    if not hasattr(gemma3, "original_model"):
        pytest.skip("the reference reads the transformers model the bridge wraps (TL 4)")
    prompt = prompts(gemma3, 34)[0]
    position = prompt.prediction_position
    demo_positions = prompt.demo_mask.nonzero()[:, 0]
    assert (position - demo_positions >= window(gemma3)).any()
    dec = il.decompose(gemma3, prompt)
    zsl, icl, z = gemma3_reference(
        gemma3.original_model, prompt.tokens, prompt.demo_mask, [position]
    )
    for layer, kind in enumerate(gemma3.original_model.config.layer_types):
        assert rel_err(dec.zsl[layer], zsl[layer]) <= REL, layer
        assert rel_err(dec.icl[layer], icl[layer]) <= REL, layer
        assert rel_err(dec.z[layer], z[layer]) <= REL, layer
        assert rel_err(dec.z_split[layer], dec.z[layer]) <= REL, layer
        seen_demos = int(dec.visible[layer, 0, 0][prompt.demo_mask].sum())
        n_demo = int(prompt.demo_mask.sum())
        assert seen_demos < n_demo if kind == "sliding_attention" else seen_demos == n_demo


def test_prefix_reuse_equals_full_forwards_past_the_window(gemma3):
    """A prefix longer than the window (the local layers' cache holds more than they
    see): the cached path is taken, without a fallback, and agrees with full forwards."""
    adapter = il.adapt(gemma3)
    first, second = prompts(gemma3, 30)
    assert len(first.prefix) > window(gemma3)
    queries = [first.query_tokens, second.query_tokens]
    what = {"attn_out", "scores", "q"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure
        runner = il.PrefixRunner(adapter, first.prefix)
        cached = runner.run(queries, what=what)
    assert runner.path == "cache"
    full = il.PrefixRunner(adapter, first.prefix, reuse=False).run(queries, what=what)
    for b, n in enumerate(cached.lengths.tolist()):
        assert rel_err(cached.logits[b, :n], full.logits[b, :n]) <= REL
    for key, x in full.values.items():
        y = cached.values[key]
        if key[0] == "scores":
            assert torch.equal(torch.isneginf(x), torch.isneginf(y)), key
            x, y = x.masked_fill(torch.isneginf(x), 0), y.masked_fill(torch.isneginf(y), 0)
        assert rel_err(y, x) <= REL, key
