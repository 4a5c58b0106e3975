"""The hierarchical bootstrap: runs (demonstration sets, orders, draws), then queries."""

from __future__ import annotations

import numpy as np
import pytest
from icl_lens.analyses import (
    bootstrap_ci,
    hierarchical_bootstrap,
    hierarchical_table,
    summary_table,
)


def test_one_run_is_the_query_bootstrap():
    x = np.random.default_rng(1).normal(size=(50, 3, 2))
    x[3, 1, 1] = np.nan
    assert hierarchical_bootstrap({(0,): x}, seed=4).ci == bootstrap_ci(x, seed=4)
    a, b = summary_table(x, seed=4), hierarchical_table({(0,): x}, seed=4)
    counts = ["layer", "head", "n_queries", "n_skipped"]
    assert a[counts].equals(b[counts])
    np.testing.assert_allclose(a[["value", "ci_low", "ci_high"]], b[["value", "ci_low", "ci_high"]])


def test_every_demonstration_set_weighs_the_same_however_many_orders_it_has():
    runs = {(1, 0): np.zeros(10), (1, 1): np.zeros(10), (2, 0): np.ones(10)}
    r = hierarchical_bootstrap(runs, n_resamples=200)
    assert r.value == pytest.approx(0.5)  # not 1/3: sets first, then their orders
    assert r.n_runs == 3 and r.n_groups == (2, 3)


def test_the_interval_covers_the_spread_between_runs():
    """Three sets whose means differ by far more than their query noise: a query
    bootstrap of their pooled values is narrow, the hierarchical one is not."""
    rng = np.random.default_rng(0)
    runs = {(s,): s + rng.normal(0, 0.01, size=200) for s in (0, 1, 2)}
    r = hierarchical_bootstrap(runs, seed=0)
    assert r.value == pytest.approx(1.0, abs=0.01)
    assert r.ci[0] < 0.5 and r.ci[1] > 1.5
    low, high = bootstrap_ci(np.concatenate(list(runs.values())), seed=0)
    assert high - low < 0.3 < r.ci[1] - r.ci[0]


def test_queries_shared_or_independent():
    rng = np.random.default_rng(2)
    same = {(s,): rng.normal(size=30) for s in range(3)}
    hierarchical_bootstrap(same)  # same queries: shared by default
    other = {(0,): rng.normal(size=30), (1,): rng.normal(size=40)}
    with pytest.raises(ValueError, match="shared_queries"):
        hierarchical_bootstrap(other)
    r = hierarchical_bootstrap(other, shared_queries=False)
    assert r.n_runs == 2 and np.isfinite(r.ci).all()


def test_nan_runs_are_skipped_and_bad_keys_refused():
    runs = {(0,): np.full(5, np.nan), (1,): np.full(5, 0.25), (2,): np.full(5, 0.75)}
    r = hierarchical_bootstrap(runs, n_resamples=100)
    assert r.value == pytest.approx(0.5)
    assert r.ci[0] >= 0.25 and r.ci[1] <= 0.75
    with pytest.raises(ValueError, match="same number of labels"):
        hierarchical_bootstrap({(0,): np.zeros(3), (1, 2): np.zeros(3)})
    with pytest.raises(ValueError, match="layers/heads"):
        hierarchical_bootstrap({(0,): np.zeros((3, 2)), (1,): np.zeros((3, 4))})
    with pytest.raises(ValueError, match="at least one run"):
        hierarchical_bootstrap({})


def test_per_layer_and_per_head_rows():
    rng = np.random.default_rng(3)
    runs = {(d,): rng.normal(d, 0.1, size=(20, 2, 3)) for d in range(3)}
    table = hierarchical_table(runs, n_resamples=100)
    assert len(table) == 1 + 2 + 6
    cells = table[table["head"] >= 0]
    expected = np.mean([x.mean(axis=0) for x in runs.values()], axis=0).ravel()
    np.testing.assert_allclose(cells["value"], expected)
    assert (cells["ci_low"] < cells["value"]).all() and (cells["value"] < cells["ci_high"]).all()
