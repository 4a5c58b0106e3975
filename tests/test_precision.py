"""Precision: masked keys read from the model's mask in every dtype, and a change at
rounding level is no change (SimAM ``changes``, SimAOU).

A random-init Gemma 3 (local layers with a window of 8, a global one between) records
ICL prompts longer than the window in float32, bfloat16 and float16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from icl_lens.analyses import ROUNDING_ULPS, rounding_level
from icl_lens.analyses._common import ROUNDING_NOTE

import icl_lens as il
from icl_lens import analyses
from icl_lens.study.measure import measure, rounding_levels
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
            assert got.dtype == dtype and want.dtype == "float32"


def test_metrics_agree_across_dtypes_within_their_precision(recorded):
    """SimAM and SimAOU of ICL (a) vs ICL in another order (b) in half precision equal
    float32's within the dtype's rounding: per query 16 ulps (measured up to 8), per
    layer 2 (measured up to 0.8). Reading masks from float16 values gave SimAM after 1.0
    instead of 0.59 at layer 2 (the masked keys entered the cosines as -65504)."""

    def metrics(dtype):
        _, zsl, icl, other = recorded[dtype]
        rounding = rounding_levels(zsl, icl, other)
        simam = analyses.simam(
            zsl.query_scores, icl.query_scores, other.query_scores, baselines=(), rounding=rounding
        )
        simaou = analyses.simaou(
            zsl.attn_out, icl.attn_out, other.attn_out, baselines=(), rounding=rounding
        )
        return {**simam.variants, **simaou.variants}

    reference = metrics("float32")
    assert reference["before"].per_layer[0] == pytest.approx(1.0, abs=1e-6)
    for dtype in DTYPES[1:]:
        for name, r in metrics(dtype).items():
            want = reference[name]
            assert np.array_equal(np.isnan(r.values), np.isnan(want.values)), (dtype, name)
            np.testing.assert_allclose(r.values, want.values, atol=16 * eps(dtype), err_msg=name)
            np.testing.assert_allclose(r.per_layer, want.per_layer, atol=2 * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_0_changes_are_rounding_on_a_rotary_model_and_left_out(recorded, dtype):
    """Rotary attention depends on relative positions only: layer 0's scores to the
    query's own tokens are ZSL's up to a few ulps after any demonstrations (BOS is outside
    the local window here), so SimAM changes there is a cosine of noise: undefined, noted
    per layer and in the overall mean. Layer 1 (global) and 2 change for real: kept. FT
    here is ICL in another order, as the test-retest ceiling measures it."""
    _, zsl, icl, other = recorded[dtype]
    m = measure(zsl, icl, other, tokens=(icl.demo_scores, other.demo_scores), n_resamples=20)
    changes = m.results["simam"].changes
    assert np.isnan(changes.values[:, 0]).all()
    assert not np.isnan(changes.values[:, 1:]).any()
    assert changes.undefined[ROUNDING_NOTE][:, 0].all()
    rows = m.frame[(m.frame["metric"] == "simam") & (m.frame["variant"] == "changes")]
    observed = rows[(rows["baseline"] == "none") & (rows["head"] == -1)].set_index("layer")
    assert observed.loc[0, "flag"].startswith(f"undefined: {ROUNDING_NOTE}")
    assert observed.loc[-1, "flag"].startswith("layer 0 left out of the mean")
    assert observed.loc[1, "flag"] is None and observed.loc[2, "flag"] is None
    assert observed.loc[-1, "value"] == pytest.approx(observed.loc[[1, 2], "value"].mean())
    # its baselines are left out with it: a random vector's cosine with noise is no null
    base = rows[(rows["baseline"] != "none") & (rows["layer"] == 0) & (rows["head"] == -1)]
    assert len(base) and base["value"].isna().all()
    # the scores' own difference at layer 0 is ulps (float32: up to 6), at layer 1 real
    for z, i in zip(zsl.query_scores, icl.query_scores, strict=True):
        seen = torch.isfinite(z) & torch.isfinite(i)
        z, i = z.double().where(seen, 0), i.double().where(seen, 0)
        ratio = (i - z).norm(dim=-1) / z.norm(dim=-1)
        assert (ratio[0] <= 16 * eps(dtype)).all() and (ratio[1] > 0.05).all()


def scores_pair(change: float, dtype=torch.float32, n: int = 4, seed: int = 0):
    """ZSL scores and ICL = ZSL changed by ``change`` of their norm in a random direction,
    in ``dtype``; FT changed by a real amount."""
    g = torch.Generator().manual_seed(seed)
    zsl = torch.randn(n, 2, 3, 12, generator=g, dtype=torch.float64)
    direction = torch.randn(n, 2, 3, 12, generator=g, dtype=torch.float64)
    direction *= zsl.norm(dim=-1, keepdim=True) / direction.norm(dim=-1, keepdim=True)
    ft = zsl + 0.3 * torch.randn(n, 2, 3, 12, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (zsl, zsl + change * direction, ft)]


def test_a_small_real_change_is_kept_and_a_rounding_one_left_out():
    """float32 scores changed by 1e-4 of their norm (840 ulps) at token 100 (the level is
    16 + 200 ulps there) are a change; by 2 ulps they are not. In bfloat16 (eps 7.8e-3)
    the same 1e-4 is below what its rounding can tell apart: left out."""
    level = rounding_level(eps("float32"), 100)
    assert level == pytest.approx((ROUNDING_ULPS + 200) * eps("float32"))
    for change, kept in ((1e-4, True), (2 * eps("float32"), False)):
        zsl, icl, ft = scores_pair(change)
        r = analyses.simam(list(zsl), list(icl), list(ft), baselines=(), rounding=level)
        assert np.isfinite(r.changes.values).all() == kept
        assert np.isnan(r.changes.values).all() == (not kept)
        assert np.isfinite(r.after.values).all() and np.isfinite(r.before.values).all()
    # the default level: ROUNDING_ULPS ulps of the inputs' dtype
    zsl, icl, ft = scores_pair(1e-4)
    assert np.isfinite(analyses.simam(list(zsl), list(icl), list(ft)).changes.values).all()
    zsl, icl, ft = scores_pair(1e-4, torch.bfloat16)
    assert np.isnan(analyses.simam(list(zsl), list(icl), list(ft)).changes.values).all()


def test_simaou_leaves_out_updates_at_rounding_level_with_their_baselines():
    """An attention output that ICL leaves unchanged up to rounding (a sliding-window
    layer whose window holds only the query), in one query and layer: that value and its
    baselines are NaN with the reason, in both variants; an update of 1e-4 is kept."""
    g = torch.Generator().manual_seed(1)
    zsl = torch.randn(5, 3, 32, generator=g)
    icl = zsl + torch.randn(5, 3, 32, generator=g)
    ft = zsl + torch.randn(5, 3, 32, generator=g)
    icl[2, 1] = zsl[2, 1] * (1 + 2 * eps("float32"))  # rounding: no update
    icl[3, 1] = zsl[3, 1] + 1e-4 * zsl[3, 1].norm() * torch.randn(32, generator=g) / 32**0.5
    r = analyses.simaou(zsl, icl, ft, n_resamples=20)
    for variant in r.variants.values():
        left_out = np.zeros((5, 3), dtype=bool)
        left_out[2, 1] = True
        assert np.array_equal(np.isnan(variant.values), left_out)
        assert np.array_equal(variant.undefined[ROUNDING_NOTE], left_out)
        for name, values in variant.baseline_values.items():
            assert np.isnan(values[2, 1]), name
        assert variant.n_skipped == 1
        notes = analyses.undefined_notes(variant)
        frame = variant.to_frame()
        layer_1 = (frame["baseline"] == "none") & (frame["layer"] == 1)
        assert notes[layer_1].item() == f"1 of 5 values left out: {ROUNDING_NOTE}"
