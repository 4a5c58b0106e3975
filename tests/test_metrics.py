"""Metrics of icl_lens.analyses on hand-made inputs with answers known by hand."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pandas as pd
import pytest
import scipy.special
import scipy.stats
import torch

from icl_lens import analyses as ila

FAST = {"n_resamples": 200}  # bootstrap size for tests that do not look at the CI


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def stack(*rows):
    """(n, layer=1, d) tensor from per-query vectors."""
    return torch.tensor(np.array(rows, dtype=np.float64)[:, None, :])


# ----------------------------------------------------------------------------- SimAOU


def test_simaou_identical_updates_give_one():
    zsl = torch.randn(5, 3, 8, dtype=torch.float64)
    icl = zsl + torch.randn(5, 3, 8, dtype=torch.float64)
    r = ila.simaou(zsl, icl, icl.clone(), **FAST)
    for variant in (r.normalised, r.unnormalised):
        np.testing.assert_allclose(variant.values, 1.0, atol=1e-12)
        assert variant.value == pytest.approx(1.0)
        assert variant.values.shape == (5, 3)
        assert variant.per_layer.shape == (3,)


def test_simaou_opposite_and_orthogonal_updates():
    zsl = torch.randn(4, 2, 6, dtype=torch.float64)
    d = torch.randn(4, 2, 6, dtype=torch.float64)
    opposite = ila.simaou(zsl, zsl + d, zsl - d, **FAST).unnormalised
    np.testing.assert_allclose(opposite.values, -1.0, atol=1e-12)

    # unit outputs: zsl = e1, icl = e2, ft = -e2 -> d_ICL = e2 - e1, d_FT = -e2 - e1
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    r = ila.simaou(stack(e1, e1), stack(e2, e2), stack(-e2, -e2), baselines=(), **FAST)
    assert r.normalised.value == pytest.approx(0.0, abs=1e-12)
    assert r.unnormalised.value == pytest.approx(0.0, abs=1e-12)


def test_simaou_normalised_and_unnormalised_differ_when_scale_matters():
    zsl, icl, ft = [1.0, 0.0], [3.0, 1.0], [1.0, 1.0]
    r = ila.simaou(stack(zsl), stack(icl), stack(ft), baselines=(), **FAST)
    # by hand: raw updates (2, 1) and (0, 1) -> 1/sqrt(5)
    assert r.unnormalised.value == pytest.approx(1 / math.sqrt(5))
    expected = cos(unit(icl) - unit(zsl), unit(ft) - unit(zsl))
    assert r.normalised.value == pytest.approx(expected)
    assert expected == pytest.approx(0.973, abs=1e-3)  # normalising inflates it


def test_simaou_means_over_queries_then_layers():
    zsl = torch.zeros(2, 2, 2, dtype=torch.float64)
    icl = torch.tensor([[[1, 0], [1, 0]], [[1, 0], [1, 0]]], dtype=torch.float64)
    # query 0: layer 0 same (1), layer 1 orthogonal (0); query 1: opposite (-1), same (1)
    ft = torch.tensor([[[2, 0], [0, 1]], [[-1, 0], [3, 0]]], dtype=torch.float64)
    r = ila.simaou(zsl, icl, ft, baselines=(), **FAST).unnormalised
    np.testing.assert_allclose(r.values, [[1, 0], [-1, 1]], atol=1e-12)
    np.testing.assert_allclose(r.per_layer, [0.0, 0.5], atol=1e-12)
    assert r.value == pytest.approx(0.25)


def test_simaou_zero_update_is_nan_and_skipped():
    # a pure rescaling is no update once normalised: cos(0, .) is undefined
    zsl, ft = [[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]
    icl = [[2.0, 0.0], [1.0, 1.0]]
    r = ila.simaou(stack(*zsl), stack(*icl), stack(*ft), baselines=(), **FAST)
    assert np.isnan(r.normalised.values[0, 0])
    assert r.normalised.n_skipped == 1
    assert r.normalised.n_queries == 1
    assert r.normalised.value == pytest.approx(cos(unit([1, 1]) - unit([1, 0]), [-1, 1]))
    assert r.unnormalised.n_skipped == 0
    frame = r.normalised.to_frame()
    assert frame.loc[frame["baseline"] == "none", "n_skipped"].tolist() == [1, 1]


def test_simaou_accepts_numpy_and_low_precision_tensors():
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 5))  # setting, n, layer, d_model
    a = ila.simaou(*x, **FAST)
    b = ila.simaou(*[torch.tensor(v, dtype=torch.bfloat16) for v in x], **FAST)
    assert a.normalised.values.shape == b.normalised.values.shape == (2, 4)
    np.testing.assert_allclose(a.normalised.values, b.normalised.values, atol=0.1)


def test_simaou_rejects_mismatched_or_nonfinite_inputs():
    z = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="one shape"):
        ila.simaou(z, z, torch.zeros(2, 3, 5))
    bad = torch.ones(2, 3, 4)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ila.simaou(z, bad, z + 1)
    with pytest.raises(ValueError, match="unknown"):
        ila.simaou(z, z + 1, z + 2, baselines=("random",))


def test_simaou_baselines_near_zero_on_random_data():
    gen = torch.Generator().manual_seed(1)
    zsl, icl, ft = (torch.randn(400, 3, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    r = ila.simaou(zsl, icl, ft, seed=3, **FAST)
    for variant in (r.normalised, r.unnormalised):
        for name, value in variant.baselines.items():
            assert abs(value) < 0.05, (variant.variant, name, value)


def test_simaou_uniform_baseline_is_biased_and_shuffled_pairing_catches_shared_shift():
    """The controls of Deutch et al.: U[0,1) is not a null, and a shared shift is not
    a per-query match."""
    gen = torch.Generator().manual_seed(2)
    n, d = 300, 32
    zsl = torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    shift = torch.ones(d, dtype=torch.float64)  # every update shares a positive offset
    icl = zsl + shift + 0.5 * torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    ft = zsl + shift + 0.5 * torch.randn(n, 1, d, generator=gen, dtype=torch.float64)
    r = ila.simaou(zsl, icl, ft, **FAST).unnormalised
    assert r.value > 0.7
    assert r.baselines["random_uniform"] > 0.5  # the paper's baseline is fooled
    assert abs(r.baselines["random_gaussian"]) < 0.05
    assert r.baselines["shuffled_queries"] > 0.7  # the match is not query-specific
    assert r.baselines["shuffled_queries"] == pytest.approx(r.value, abs=0.05)


def test_simaou_is_seeded():
    x = [torch.randn(10, 2, 8) for _ in range(3)]
    a, b, c = (
        ila.simaou(*x, seed=5, **FAST),
        ila.simaou(*x, seed=5, **FAST),
        ila.simaou(*x, seed=6, **FAST),
    )
    for name in ila.BASELINES["simaou"]:
        np.testing.assert_array_equal(
            a.normalised.baseline_values[name], b.normalised.baseline_values[name]
        )
    assert a.normalised.baselines != c.normalised.baselines
    assert a.normalised.ci == b.normalised.ci


# ----------------------------------------------------------------------------- Rec2FTP


def test_rec2ftp_by_hand():
    zsl = [0, 0, 0, 0, 0, 1, 1]
    ft = [1, 1, 1, 1, 0, 1, 0]
    icl = [1, 1, 1, 0, 1, 1, 1]
    r = ila.rec2ftp(zsl, icl, ft, **FAST)
    assert r.value == pytest.approx(0.75)
    assert r.percent == pytest.approx(75.0)
    assert (r.n_both, r.n_ft_recovered, r.n_zsl_wrong, r.n_icl_recovered) == (3, 4, 5, 4)
    assert r.baselines == {"independent": pytest.approx(0.8)}
    assert r.ci[0] <= r.value <= r.ci[1]
    np.testing.assert_array_equal(r.per_query[:5], [1, 1, 1, 0, np.nan])
    frame = r.to_frame()
    assert frame[["baseline", "layer", "head", "n_queries"]].values.tolist() == [
        ["none", -1, -1, 4],
        ["independent", -1, -1, 5],
    ]


def test_rec2ftp_accepts_bools_and_tensors():
    r = ila.rec2ftp(
        zsl=np.array([False, False, True]),
        icl=torch.tensor([True, False, True]),
        ft=[True, True, True],
        **FAST,
    )
    assert r.value == pytest.approx(0.5)


def test_rec2ftp_nan_when_ft_fixes_nothing():
    r = ila.rec2ftp(zsl=[0, 0, 1], icl=[1, 1, 1], ft=[0, 0, 1], **FAST)
    assert math.isnan(r.value)
    assert (r.n_ft_recovered, r.n_both, r.n_zsl_wrong) == (0, 0, 2)
    assert all(math.isnan(x) for x in r.ci)
    assert r.baselines["independent"] == pytest.approx(1.0)


def test_rec2ftp_rejects_labels_and_length_mismatch():
    with pytest.raises(ValueError, match="pred == gold"):
        ila.rec2ftp(zsl=[0, 2], icl=[1, 1], ft=[1, 1])
    with pytest.raises(ValueError, match="one entry per query"):
        ila.rec2ftp(zsl=[0, 1], icl=[1], ft=[1, 1])


# ----------------------------------------------------------------------------- Kendall


def test_kendall_hand_computed():
    # no ties: one discordant pair of 6 -> (5 - 1) / 6
    # ties: x=[1,2,2,3], y=[1,2,3,3]: 4 concordant, 0 discordant, 1 tie in each,
    # tau_b = 4 / sqrt((6 - 1) * (6 - 1)) = 0.8
    icl = [np.array([[1.0, 2, 3, 4]]), np.array([[1.0, 2, 2, 3]])]
    ft = [np.array([[1.0, 3, 2, 4]]), np.array([[1.0, 2, 3, 3]])]
    r = ila.kendall(icl, ft, **FAST).tau_b
    np.testing.assert_allclose(r.values, [[2 / 3], [0.8]])
    assert r.value == pytest.approx((2 / 3 + 0.8) / 2)


def test_kendall_matches_scipy_tau_b_with_ties():
    rng = np.random.default_rng(4)
    icl = [rng.integers(0, 4, size=(3, 12)).astype(float) for _ in range(5)]
    ft = [rng.integers(0, 3, size=(3, 12)).astype(float) for _ in range(5)]
    r = ila.kendall(icl, ft, baselines=(), **FAST).tau_b
    for q in range(5):
        for layer in range(3):
            expected = scipy.stats.kendalltau(icl[q][layer], ft[q][layer], variant="b").statistic
            assert r.values[q, layer] == pytest.approx(expected)
    # a strictly increasing transform (softmax, as the authors apply) changes nothing
    soft = [torch.softmax(torch.tensor(a), dim=-1) for a in icl]
    np.testing.assert_allclose(ila.kendall(soft, ft, baselines=(), **FAST).tau_b.values, r.values)


def test_kendall_skips_constant_vectors_and_counts_them():
    icl = [np.array([[1.0, 2, 3], [5.0, 5, 5]]), np.array([[3.0, 2, 1], [1.0, 2, 3]])]
    ft = [np.array([[1.0, 2, 3], [1.0, 2, 3]]), np.array([[1.0, 2, 3], [4.0, 4, 4]])]
    with np.errstate(all="raise"):
        r = ila.kendall(icl, ft, **FAST).tau_b
    assert np.isnan(r.values[0, 1]) and np.isnan(r.values[1, 1])
    assert r.n_skipped == 2
    np.testing.assert_allclose(r.values[:, 0], [1.0, -1.0])
    assert r.value == pytest.approx(0.0)  # layer 1 has no defined value: layer 0 only
    assert np.isnan(r.per_layer[1])
    assert np.isnan(r.baseline_values["random_uniform"][0, 1])  # constant ICL scores
    layer_rows = r.to_frame().query("baseline == 'none' and layer >= 0")
    assert layer_rows["n_skipped"].tolist() == [0, 2]
    assert layer_rows["n_queries"].tolist() == [2, 0]


def test_kendall_uses_first_100_queries_by_default():
    rng = np.random.default_rng(5)
    icl = torch.tensor(rng.normal(size=(120, 2, 10)))
    ft = torch.tensor(rng.normal(size=(120, 2, 10)))
    assert ila.kendall(icl, ft, **FAST).tau_b.values.shape == (100, 2)
    assert ila.kendall(icl, ft, max_queries=None, **FAST).tau_b.values.shape == (120, 2)
    assert ila.kendall(icl, ft, max_queries=7, **FAST).tau_b.n_queries == 7


def test_kendall_random_baseline_near_zero():
    rng = np.random.default_rng(6)
    icl = [rng.normal(size=(4, 30)) for _ in range(200)]
    ft = [a + 0.5 * rng.normal(size=a.shape) for a in icl]
    r = ila.kendall(icl, ft, max_queries=None, seed=1, **FAST).tau_b
    assert r.value > 0.5
    assert abs(r.baselines["random_uniform"]) < 0.05
    assert abs(r.baselines["shuffled_queries"]) < 0.05


def test_kendall_shuffled_baseline_only_for_equal_lengths():
    icl = [np.random.rand(2, 5), np.random.rand(2, 6)]
    ft = [np.random.rand(2, 5), np.random.rand(2, 6)]
    assert set(ila.kendall(icl, ft, **FAST).tau_b.baselines) == {"random_uniform"}
    with pytest.raises(ValueError, match="same number of"):
        ila.kendall(icl, ft, baselines=("shuffled_queries",))
    with pytest.raises(ValueError, match="1:1"):
        ila.kendall(icl, [np.random.rand(2, 5), np.random.rand(2, 5)])


# ----------------------------------------------------------------------------- SimAM


def test_simam_on_changes_differs_from_paper():
    zsl = [torch.tensor([[[1.0, 0.0, 0.0]]])]
    icl = [torch.tensor([[[1.0, 1.0, 0.0]]])]
    ft = [torch.tensor([[[1.0, 0.0, 1.0]]])]
    r = ila.simam(zsl, icl, ft, baselines=(), **FAST)
    assert r.after.value == pytest.approx(0.5)  # paper: cos(ICL, FT)
    assert r.before.value == pytest.approx(1 / math.sqrt(2))  # cos(ICL, ZSL)
    assert r.changes.value == pytest.approx(0.0)  # ICL and FT change different tokens
    assert list(r.variants) == ["after", "before", "changes"]


def test_simam_breakdowns_and_variable_lengths():
    rng = np.random.default_rng(7)
    lengths = [3, 5, 4]
    zsl = [rng.normal(size=(2, 3, t)) for t in lengths]
    icl = [rng.normal(size=(2, 3, t)) for t in lengths]
    ft = [rng.normal(size=(2, 3, t)) for t in lengths]
    r = ila.simam(zsl, icl, ft, **FAST)
    expected = np.array(
        [
            [[cos(icl[q][layer, h], ft[q][layer, h]) for h in range(3)] for layer in range(2)]
            for q in range(3)
        ]
    )
    np.testing.assert_allclose(r.after.values, expected)
    np.testing.assert_allclose(r.after.per_head, expected.mean(axis=0))
    np.testing.assert_allclose(r.after.per_layer, expected.mean(axis=(0, 2)))
    assert r.after.value == pytest.approx(expected.mean())

    frame = r.to_frame()
    assert list(frame.columns) == list(ila.FRAME_COLUMNS)
    one = frame.query("variant == 'after' and baseline == 'none'")
    assert len(one) == 1 + 2 + 2 * 3  # overall, layers, (layer, head) cells
    assert one.iloc[0][["layer", "head"]].tolist() == [-1, -1]
    cell = one.query("layer == 1 and head == 2")["value"].item()
    assert cell == pytest.approx(expected[:, 1, 2].mean())
    assert set(frame["baseline"]) == {"none", *ila.BASELINES["simam"]}
    assert len(frame) == 3 * 5 * len(one)


def test_simam_shuffled_baselines_by_hand():
    # 2 queries, 1 layer, 2 heads; lengths 2 and 3
    zsl = [np.zeros((1, 2, 2)), np.zeros((1, 2, 3))]
    icl = [np.array([[[1.0, 0.0], [0.0, 1.0]]]), np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])]
    ft = [np.array([[[1.0, 0.0], [0.0, 1.0]]]), np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])]
    r = ila.simam(zsl, icl, ft, baselines=("shuffled_heads", "shuffled_queries"), **FAST)
    # heads swapped: head 0 of query 0 vs head 1 -> 0
    np.testing.assert_allclose(r.after.baseline_values["shuffled_heads"][0], [[0.0, 0.0]])
    # query 0 vs query 1 right-aligned: icl0 head 0 (1, 0) against ft1 head 0 last 2
    # tokens (1, 0) -> 1 / (|(1,0)| |(0,1,0)|) = 1; head 1 (0, 1) vs (0, 2) -> 1
    np.testing.assert_allclose(r.after.baseline_values["shuffled_queries"][0], [[1.0, 1.0]])
    # query 1 vs query 0: icl1 head 0 (1, 0, 0) -> its last 2 tokens (0, 0) -> 0
    np.testing.assert_allclose(r.after.baseline_values["shuffled_queries"][1], [[0.0, 1.0]])


def test_simam_baselines_near_zero_on_random_data():
    gen = torch.Generator().manual_seed(8)
    scores = {
        s: [torch.randn(2, 4, 20, generator=gen) for _ in range(150)] for s in ("zsl", "icl", "ft")
    }
    r = ila.simam(**scores, seed=2, **FAST)
    # cos(ICL - ZSL, FT - ZSL) of independent Gaussians is 1/2: both changes share -ZSL
    assert r.changes.value == pytest.approx(0.5, abs=0.05)
    assert r.after.value == pytest.approx(0.0, abs=0.05)
    assert r.before.value == pytest.approx(0.0, abs=0.05)
    for variant in r.variants.values():  # no baseline shares ZSL with the first argument
        for name, value in variant.baselines.items():
            assert abs(value) < 0.05, (variant.variant, name, value)


def test_simam_zero_change_is_skipped_and_inputs_checked():
    z = [np.ones((1, 2, 3))]
    i = [np.array([[[1.0, 2, 3], [1, 1, 1]]])]
    r = ila.simam(z, i, [np.ones((1, 2, 3)) * 2], baselines=(), **FAST)
    assert np.isnan(r.changes.values[0, 0, 1])  # ICL leaves head 1 unchanged
    assert r.changes.n_skipped == 1 and r.after.n_skipped == 0
    with pytest.raises(ValueError, match="demonstration columns"):
        ila.simam(z, [np.ones((1, 2, 4))], z)
    with pytest.raises(ValueError, match="2 heads"):
        ila.simam([np.ones((1, 1, 3))] * 2, [np.ones((1, 1, 3))] * 2, [np.ones((1, 1, 3))] * 2)


# ----------------------------------------------------------------------------- summary


def test_bootstrap_ci_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(9)
    small, large = rng.normal(0.3, 1.0, size=50), rng.normal(0.3, 1.0, size=2000)
    lo_s, hi_s = ila.bootstrap_ci(small, seed=1)
    lo_l, hi_l = ila.bootstrap_ci(large, seed=1)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # ~ sqrt(2000 / 50) = 6.3 times narrower
    # about 1.96 * sd / sqrt(n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.2)
    assert ila.bootstrap_ci(small, seed=1) == (lo_s, hi_s)  # seeded
    assert ila.bootstrap_ci(small, confidence=0.5, seed=1)[1] < hi_s


def test_bootstrap_skips_nan_and_handles_degenerate_inputs():
    values = np.array([0.1, np.nan, 0.3, 0.5, np.nan])
    assert ila.hierarchical_mean(values) == pytest.approx(0.3)
    lo, hi = ila.bootstrap_ci(values)
    assert 0.1 <= lo <= 0.3 <= hi <= 0.5
    assert all(math.isnan(x) for x in ila.bootstrap_ci(np.full(4, np.nan)))
    assert ila.bootstrap_ci(np.array([0.7])) == (0.7, 0.7)
    assert all(math.isnan(x) for x in ila.bootstrap_ci(np.zeros((0, 2))))


def test_hierarchical_mean_order_with_nan():
    # layer 0: queries (1, nan) -> 1; layer 1: (0, 0) -> 0; overall (1 + 0) / 2
    values = np.array([[1.0, 0.0], [np.nan, 0.0]])
    assert ila.hierarchical_mean(values) == pytest.approx(0.5)
    table = ila.summary_table(values, n_resamples=100)
    assert table[["layer", "n_queries", "n_skipped"]].values.tolist() == [
        [-1, 2, 1],
        [0, 1, 1],
        [1, 2, 0],
    ]


def test_aggregate_runs_over_seeds():
    x = [torch.randn(6, 2, 4) for _ in range(3)]
    frames = {seed: ila.simaou(*x, seed=seed, **FAST).to_frame() for seed in (0, 1, 2)}
    agg = ila.aggregate_runs(frames)
    assert list(agg.columns) == [
        "metric",
        "variant",
        "baseline",
        "layer",
        "head",
        "mean",
        "std",
        "min",
        "max",
        "n",
    ]
    assert len(agg) == len(frames[0])
    row = agg.query("variant == 'normalised' and baseline == 'random_gaussian' and layer == -1")
    vals = [
        f.query("variant == 'normalised' and baseline == 'random_gaussian' and layer == -1")[
            "value"
        ].item()
        for f in frames.values()
    ]
    assert row["mean"].item() == pytest.approx(np.mean(vals))
    assert row["std"].item() == pytest.approx(np.std(vals, ddof=1))
    assert (row["min"].item(), row["max"].item(), row["n"].item()) == (min(vals), max(vals), 3)
    # the observed metric does not depend on the seed: zero spread
    obs = agg.query("baseline == 'none'")
    np.testing.assert_allclose(obs["std"], 0.0, atol=1e-12)


def test_aggregate_runs_on_a_concatenated_frame():
    df = pd.DataFrame(
        {
            "metric": ["kendall"] * 4,
            "task": ["sst2", "sst2", "mr", "mr"],
            "seed": [0, 1, 0, 1],
            "value": [0.2, np.nan, 0.1, 0.3],
        }
    )
    agg = ila.aggregate_runs(df, over="seed")
    assert agg[["task", "n"]].values.tolist() == [["sst2", 1], ["mr", 2]]
    assert agg.loc[agg.task == "mr", "mean"].item() == pytest.approx(0.2)
    assert math.isnan(agg.loc[agg.task == "sst2", "std"].item())
    with pytest.raises(ValueError, match="several rows per run"):
        ila.aggregate_runs(df.drop(columns="task"), over="seed")


def test_results_frame_and_result_immutability():
    r = ila.rec2ftp(zsl=[0, 1], icl=[1, 1], ft=[1, 0], **FAST)
    k = ila.kendall([np.array([[1.0, 2, 3]])], [np.array([[1.0, 3, 2]])], **FAST).tau_b
    frame = ila.results_frame(r, k)
    assert list(frame.columns) == list(ila.FRAME_COLUMNS)
    assert set(frame["metric"]) == {"rec2ftp", "kendall"}
    assert frame["layer"].dtype == np.int64 and frame["head"].dtype == np.int64
    with pytest.raises(AttributeError):
        k.value = 1.0  # frozen
    with pytest.raises(ValueError):
        k.values[0, 0] = 1.0  # read-only
    frame.loc[0, "value"] = 9.0
    assert r.to_frame().loc[0, "value"] == 1.0  # to_frame returns a copy
    assert "kendall" in repr(k) and "baselines" in repr(k)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".summary",
        ".result",
        ".rec2ftp",
        ".simaou",
        ".simam",
        ".kendall",
        ".topk_recall",
        ".hierarchical",
        ".flags",
        "._common",
    ],
)
def test_docstring_examples_run(name):
    module = importlib.import_module("icl_lens.analyses" + name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ---- tokens a layer cannot see (sliding windows): -inf scores ---------------------------


def test_kendall_ranks_only_the_tokens_each_layer_sees():
    """-inf (masked: outside a local layer's window) leaves a token out of both
    rankings, per query and layer; NaN and +inf stay errors on either side."""
    rng = np.random.default_rng(3)
    icl, ft = rng.normal(size=(4, 2, 9)), rng.normal(size=(4, 2, 9))
    masked = icl.copy()
    masked[:, 0, :4] = -np.inf  # layer 0 is local: the first 4 tokens are out of its window
    r = ila.kendall(list(masked), list(ft), **FAST).tau_b
    for q in range(4):
        assert r.values[q, 0] == pytest.approx(
            scipy.stats.kendalltau(icl[q, 0, 4:], ft[q, 0, 4:], variant="b").statistic
        )
        assert r.values[q, 1] == pytest.approx(
            scipy.stats.kendalltau(icl[q, 1], ft[q, 1], variant="b").statistic
        )
    assert np.isfinite(r.baseline_values["random_uniform"]).all()
    assert np.isfinite(r.baseline_values["shuffled_queries"]).all()
    for bad, where, message in (
        (np.nan, "icl", "NaN or \\+inf"),
        (np.inf, "icl", "NaN or \\+inf"),
        (np.nan, "ft", "NaN or \\+inf"),
    ):
        a, b = masked.copy(), ft.copy()
        (a if where == "icl" else b)[1, 1, 2] = bad
        with pytest.raises(ValueError, match=message):
            ila.kendall(list(a), list(b), **FAST)


def test_kendall_of_two_masked_sides_ranks_the_tokens_both_see():
    """ICL against ICL in another order (the icl_retest ceiling): each side can lose
    different tokens to the window; tau is over the tokens both see."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 1, 10)), rng.normal(size=(3, 1, 10))
    a[:, 0, :3] = -np.inf
    b[:, 0, 7:] = -np.inf
    r = ila.kendall(list(a), list(b), baselines=()).tau_b
    for q in range(3):
        expected = scipy.stats.kendalltau(a[q, 0, 3:7], b[q, 0, 3:7], variant="b").statistic
        assert r.values[q, 0] == pytest.approx(expected)


def test_simam_compares_the_tokens_every_setting_sees():
    """A column that ICL's head cannot see (BOS outside the window behind the
    demonstrations) is dropped from all three vectors of that head."""
    rng = np.random.default_rng(4)
    zsl, icl, ft = (rng.normal(size=(3, 2, 2, 5)) for _ in range(3))  # n layer head tokens
    masked = icl.copy()
    masked[:, 0, :, 0] = -np.inf
    r = ila.simam(list(zsl), list(masked), list(ft), **FAST)
    dropped = ila.simam(
        list(zsl[:, :1, :, 1:]), list(icl[:, :1, :, 1:]), list(ft[:, :1, :, 1:]), baselines=()
    )
    kept = ila.simam(list(zsl[:, 1:]), list(icl[:, 1:]), list(ft[:, 1:]), baselines=())
    for variant in ("after", "before", "changes"):
        got = getattr(r, variant).values
        np.testing.assert_allclose(got[:, :1], getattr(dropped, variant).values)
        np.testing.assert_allclose(got[:, 1:], getattr(kept, variant).values)
        for values in getattr(r, variant).baseline_values.values():
            assert np.isfinite(values).all()
    bad = icl.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        ila.simam(list(zsl), list(bad), list(ft), **FAST)


def test_kendall_by_example_sums_each_sides_softmax_per_demonstration():
    """The authors' example level (compute_training_example_attn.py 157-173, then the
    same tau loop): softmax over each side's tokens, summed per demonstration, tau-b over
    the demonstrations. Unlike the token level, the scores' scale matters."""
    rng = np.random.default_rng(11)
    groups = (2, 3, 4, 1)
    icl = [rng.normal(size=(2, 10)) for _ in range(6)]
    ft = [rng.normal(size=(2, 10)) for _ in range(6)]
    r = ila.kendall(icl, ft, groups=groups, baselines=(), **FAST)
    edges = np.cumsum([0, *groups])

    def per_example(x):
        p = scipy.special.softmax(x)
        return [p[s:e].sum() for s, e in zip(edges[:-1], edges[1:], strict=True)]

    for q in range(6):
        for layer in range(2):
            a, b = per_example(icl[q][layer]), per_example(ft[q][layer])
            expected = scipy.stats.kendalltau(a, b, variant="b").statistic
            assert r.example.values[q, layer] == pytest.approx(expected)
    sharper = ila.kendall([3 * a for a in icl], ft, groups=groups, baselines=(), **FAST)
    np.testing.assert_allclose(sharper.tau_b.values, r.tau_b.values)  # ranks: unchanged
    assert not np.allclose(sharper.example.values, r.example.values)  # sums: changed
    assert set(r.variants) == {"tau_b", "example"}
    assert set(ila.kendall(icl, ft, **FAST).variants) == {"tau_b"}
