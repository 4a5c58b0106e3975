"""Precision: masked keys read from the model's mask in every dtype.

A random-init Gemma 3 (local layers with a window of 8, a global one between) records
ICL prompts longer than the window in float32, bfloat16 and float16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import icl_lens as il
from icl_lens import analyses
from icl_lens.study.predict import label_tokens
from icl_lens.study.records import record
from tests.models import GEMMA3_WINDOW, make_hf_model, make_tokenizer

DTYPES = ("float32", "bfloat16", "float16")
SPEC = il.TaskSpec("demo", "Sentence: {text} Label:", (" bad", " good"))
DEMOS = [
    "Sentence: w1 w2 w3 Label: good",
    "Sentence: w4 w5 Label: bad",
    "Sentence: w6 w50 Label: good",
    "Sentence: w7 w8 w9 Label: bad",
]
QUERIES = ["Sentence: w11 Label:", "Sentence: w12 w60 Label:", "Sentence: w13 w14 w61 Label:"]


def eps(dtype: str) -> float:
    return torch.finfo(getattr(torch, dtype)).eps


def prompt(demos):
    return il.build_prompt(make_tokenizer(), demos, QUERIES[0], separator=" \n")


@pytest.fixture(scope="module")
def recorded():
    """Per dtype: the model and ZSL, ICL, ICL with the demonstrations reversed."""
    tok = make_tokenizer()
    labels = label_tokens(tok, SPEC)
    queries = [il.build_prompt(tok, [], q).query_tokens for q in QUERIES]
    out = {}
    for dtype in DTYPES:
        model = il.load_model(make_hf_model("gemma3"), tokenizer=tok, dtype=dtype)
        runs = [
            record(model, p, queries, labels)
            for p in (
                torch.tensor([tok.bos_token_id]),
                prompt(DEMOS).prefix,
                prompt(DEMOS[::-1]).prefix,
            )
        ]
        out[dtype] = (model, *runs)
    return out


def neginf_pattern(rec) -> list[torch.Tensor]:
    demo = [] if rec.demo_scores is None else [torch.isneginf(rec.demo_scores)]
    return [torch.isneginf(s) for s in rec.query_scores] + demo


def test_masked_keys_are_read_from_the_mask_in_every_dtype(recorded):
    """float16 adds -65504 to a masked score, which no float32 threshold recognises (0 of
    the out-of-window keys were before); the -inf pattern is the model's window in every
    dtype: keys at least ``window`` tokens back on local layers, none on the global one."""
    _, _, icl, _ = recorded["float32"]
    layer_types = make_hf_model("gemma3").config.layer_types
    n_prefix = icl.prefix_length
    for n, position in enumerate(icl.positions.tolist()):
        too_far = n_prefix + position - torch.arange(1, n_prefix) >= GEMMA3_WINDOW
        assert too_far.any() and (~too_far).any()
        for layer, kind in enumerate(layer_types):
            local = kind == "sliding_attention"
            expected = too_far if local else torch.zeros_like(too_far)
            assert torch.equal(torch.isneginf(icl.demo_scores[n, layer]), expected)
    for dtype in DTYPES[1:]:
        for name, got, want in zip(
            ("zsl", "icl", "icl reversed"),
            recorded[dtype][1:],
            recorded["float32"][1:],
            strict=True,
        ):
            for a, b in zip(neginf_pattern(got), neginf_pattern(want), strict=True):
                assert torch.equal(a, b), (dtype, name)


def test_metrics_agree_across_dtypes_within_their_precision(recorded):
    """SimAM and SimAOU of ICL (a) vs ICL in another order (b) in half precision equal
    float32's within the dtype's rounding: per query 16 ulps (measured up to 8), per
    layer 2 (measured up to 0.8). Reading masks from float16 values gave SimAM after 1.0
    instead of 0.59 at layer 2 (the masked keys entered the cosines as -65504)."""

    def metrics(dtype):
        _, zsl, icl, other = recorded[dtype]
        simam = analyses.simam(zsl.query_scores, icl.query_scores, other.query_scores, baselines=())
        simaou = analyses.simaou(zsl.attn_out, icl.attn_out, other.attn_out, baselines=())
        return {"after": simam.after, "before": simam.before, **simaou.variants}

    reference = metrics("float32")
    assert reference["before"].per_layer[0] == pytest.approx(1.0, abs=1e-6)
    for dtype in DTYPES[1:]:
        for name, r in metrics(dtype).items():
            want = reference[name]
            assert np.array_equal(np.isnan(r.values), np.isnan(want.values)), (dtype, name)
            np.testing.assert_allclose(r.values, want.values, atol=16 * eps(dtype), err_msg=name)
            np.testing.assert_allclose(r.per_layer, want.per_layer, atol=2 * eps(dtype))
