"""The authors' top-k recall, the flags where a value cannot speak, and the learning-rate
grid's edges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.special
from icl_lens.analyses import indistinguishable, rec2ftp, rec2ftp_flag, topk_recall

from icl_lens.study.lr_search import LrTrial, lr_edge_flag, next_lr, select_lr

# ---- top-k recall ---------------------------------------------------------------------


def test_topk_recall_leaves_out_the_tokens_a_layer_does_not_see():
    """-inf scores (outside a local layer's window, on either side) leave tokens out of
    that cell: the same recall as on the seen tokens alone, at both levels; a
    demonstration with no seen token leaves the example level."""
    rng = np.random.default_rng(6)
    icl, ft = rng.normal(size=(1, 14)), rng.normal(size=(1, 14))
    masked_icl, masked_ft = icl.copy(), ft.copy()
    masked_icl[0, :3] = -np.inf  # demonstration 0 (2 tokens) and 1 token of demonstration 1
    masked_ft[0, 13] = -np.inf  # the other side loses the last token
    got = topk_recall([masked_icl], [masked_ft], k=4, groups=(2, 3, 3, 3, 3), k_example=2)
    seen = topk_recall([icl[:, 3:13]], [ft[:, 3:13]], k=4, groups=(2, 3, 3, 2), k_example=2)
    assert got.token.values[0, 0] == seen.token.values[0, 0]
    assert got.example.values[0, 0] == seen.example.values[0, 0]
    # k not below the seen tokens: undefined, though the row has 14 tokens
    assert np.isnan(topk_recall([masked_icl], [masked_ft], k=10).token.values[0, 0])


def test_topk_random_baseline_draws_among_the_seen_tokens():
    """Its expectation is k / n over the n seen tokens (2/5 here), not k / 10."""
    rng = np.random.default_rng(7)
    icl, ft = rng.normal(size=(400, 1, 10)), rng.normal(size=(400, 1, 10))
    icl[:, :, :5] = -np.inf
    r = topk_recall(list(icl), list(ft), k=2, baselines=("random_uniform",), n_resamples=10)
    assert np.nanmean(r.token.baseline_values["random_uniform"]) == pytest.approx(0.4, abs=0.04)


def _authors_recall(icl_map, ft_map, k):
    """compute_training_example_attn.py, ``recall_topk`` for one (query, layer)."""
    ftzs_topk = np.argsort(-ft_map)[:k].tolist()
    icl_topk = np.argsort(-icl_map)[:k].tolist()
    return sum(icl_topk[i] in ftzs_topk for i in range(k)) / k


def test_topk_recall_matches_the_authors_loop():
    rng = np.random.default_rng(0)
    icl = [rng.normal(size=(2, 140)) for _ in range(5)]
    ft = [rng.normal(size=(2, 140)) for _ in range(5)]
    groups = [10] * 14
    r = topk_recall(icl, ft, groups=groups)
    pairs = list(zip(icl, ft, strict=True))
    token = [[_authors_recall(a[la], b[la], 100) for la in range(2)] for a, b in pairs]
    np.testing.assert_allclose(r.token.values, token)

    def by_example(x):  # softmax over tokens, summed per demonstration, as the authors
        p = scipy.special.softmax(x, axis=-1)
        return p.reshape(2, 14, 10).sum(-1)

    example = [
        [_authors_recall(by_example(a)[la], by_example(b)[la], 5) for la in range(2)]
        for a, b in pairs
    ]
    np.testing.assert_allclose(r.example.values, example)
    same = topk_recall(icl, icl, groups=groups)
    assert same.token.value == 1.0 and same.example.value == 1.0


def test_topk_recall_is_undefined_when_k_covers_every_item():
    icl = [np.arange(12.0).reshape(1, 12)] * 3
    r = topk_recall(icl, icl, k=12, groups=[4, 4, 4], k_example=3)
    assert np.isnan(r.token.value) and r.token.n_skipped == 3
    assert np.isnan(r.example.value)
    r = topk_recall(icl, icl, k=11)
    assert r.token.value == 1.0 and r.example is None


def test_topk_random_baseline_is_the_authors_k_over_n():
    rng = np.random.default_rng(1)
    icl = [rng.normal(size=(3, 200)) for _ in range(50)]
    ft = [rng.normal(size=(3, 200)) for _ in range(50)]
    r = topk_recall(icl, ft, k=20, max_queries=None, seed=3)
    assert r.token.baselines["random_uniform"] == pytest.approx(20 / 200, abs=0.01)
    assert r.token.value == pytest.approx(0.1, abs=0.02)  # independent scores: chance too
    with pytest.raises(ValueError, match="groups add up"):
        topk_recall(icl, ft, groups=[100, 99])


# ---- flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zsl", "icl", "ft", "expected"),
    [
        ([1, 1], [1, 0], [1, 1], "undefined: ZSL gets every query right"),
        ([0, 0], [1, 0], [0, 0], "undefined: FT fixes none"),
        ([0, 0, 1], [1, 1, 0], [1, 0, 1], "ICL is right on every query ZSL gets wrong"),
        ([0, 0, 1], [0, 0, 1], [1, 0, 1], "ICL is right on none"),
        ([0, 0, 1], [1, 0, 1], [1, 1, 1], "FT is right on every query ZSL gets wrong"),
        ([0, 0, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], "equal to its independent baseline"),
        ([0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], None),
    ],
)
def test_rec2ftp_flags_values_fixed_by_the_accuracies(zsl, icl, ft, expected):
    flag = rec2ftp_flag(rec2ftp(zsl=zsl, icl=icl, ft=ft))
    assert flag is None if expected is None else expected in flag


def test_a_value_overlapping_a_shuffled_pairing_is_not_distinguishable():
    rows = []
    for mode, (low, high) in (("standard", (0.40, 0.60)), ("layer_causal", (0.70, 0.80))):
        rows += [
            ("simaou", "normalised", "none", mode, (low + high) / 2, low, high),
            ("simaou", "normalised", "shuffled_queries", mode, 0.45, 0.42, 0.48),
            ("simaou", "normalised", "random_uniform", mode, 0.5, 0.0, 1.0),  # not a null
        ]
    frame = pd.DataFrame(
        rows, columns=["metric", "variant", "baseline", "ft_mode", "value", "ci_low", "ci_high"]
    ).assign(layer=-1, head=-1)
    flags = indistinguishable(frame).tolist()
    assert flags == ["not distinguishable from shuffled_queries"] + [None] * 5


# ---- learning-rate grid edges -----------------------------------------------------------


def _trials(pairs):
    return [LrTrial(lr, acc, None, acc is None, []) for lr, acc in pairs]


def test_the_grid_grows_past_an_edge_that_reaches_the_best_accuracy():
    grid = (0.1, 0.3, 1.0, 3.0)
    flat = _trials([(lr, 0.5) for lr in grid])  # FT changes nothing: every rate ties
    assert next_lr(flat, grid=grid, max_extra=2) == 10.0  # larger rates first
    better = flat + _trials([(10.0, 1.0)])
    assert next_lr(better, grid=grid, max_extra=2) == 30.0  # it improved: keep going
    diverged = better + _trials([(30.0, None)])
    assert next_lr(diverged, grid=grid, max_extra=2) is None  # 0.1 is not at the best
    assert select_lr(diverged).lr == 10.0 and lr_edge_flag(diverged, grid=grid, max_extra=2) is None

    low = _trials([(1e-4, 0.8), (1e-3, 0.6), (1e-2, 0.5)])
    grid = (1e-4, 1e-3, 1e-2)
    assert next_lr(low, grid=grid, max_extra=2) == 3e-5
    plateau = low + _trials([(3e-5, 0.8)])  # no better below: stop, and say so
    assert next_lr(plateau, grid=grid, max_extra=2) is None
    flag = lr_edge_flag(plateau, grid=grid, max_extra=2)
    assert flag.startswith("lr 3e-05 is the smallest of the grid (3e-05..0.01)")
    assert "extended with 3e-05" in flag and "--lr-grid 3e-06,1e-05,3e-05" in flag
    assert next_lr(low, grid=grid, max_extra=0) is None
    assert next_lr(_trials([(0.1, 0.9)]), grid=(0.1,), max_extra=2) is None  # the user's choice


def test_grid_growth_stops_at_its_bound():
    grid = (1.0, 3.0)
    trials = _trials([(1.0, 0.1), (3.0, 0.2)])
    while (lr := next_lr(trials, grid=grid, max_extra=3)) is not None:
        trials += _trials([(lr, trials[-1].accuracy + 0.1)])  # always better
    assert [t.lr for t in trials] == [1.0, 3.0, 10.0, 30.0, 100.0]
    assert "the largest of the grid" in lr_edge_flag(trials, grid=grid, max_extra=3)


@pytest.mark.parametrize(
    "name", ["lr_search", "orders", "measure", "compare", "runs", "comparison"]
)
def test_study_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"icl_lens.study.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
