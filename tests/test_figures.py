"""matplotlib figures: what is drawn equals the frames it comes from (lines, bands,
grids, bars, the momentum study's dots and means), the inline SVG is reproducible and
escaped, and every view module's docstring examples run."""

from __future__ import annotations

import doctest
import importlib
import re
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import icl_lens as il
from icl_lens import analyses as ila
from icl_lens.momentum_study.config import StudyConfig
from icl_lens.momentum_study.figure import momentum_figure
from icl_lens.views import viz
from icl_lens.views.figures import NotebookFigure, plot_accuracy, plot_layers, svg
from tests.models import make_model, make_tokenizer


@pytest.fixture(scope="module")
def metrics() -> pd.DataFrame:
    g = np.random.default_rng(0)
    n, layers, heads = 12, 3, 4
    outs = g.standard_normal((3, n, layers, 16))
    scores = g.standard_normal((3, n, layers, heads, 6))
    kendall = g.standard_normal((2, n, layers, 9))
    return ila.results_frame(
        ila.simaou(*outs, n_resamples=100),
        ila.simam(*scores, n_resamples=100),
        ila.kendall(*kendall, n_resamples=100),
    )


@pytest.fixture(scope="module")
def comparison(metrics) -> il.Comparison:
    return il.Comparison(accuracy={"zsl": 0.5, "icl": 0.75, "ft": 0.625}, frame=metrics)


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    model, _ = make_model("gpt2")
    p = il.build_prompt(make_tokenizer(), ["w1 w2 good", "w3 bad"], "w4 w5", separator=" \n")
    ids = make_tokenizer().convert_tokens_to_ids(["bad", "good"])
    return il.decompose(model, p, label_tokens=tuple(ids))


def _rows(frame: pd.DataFrame, metric: str, variant: str, baseline: str = "none"):
    sel = frame.query(
        "metric == @metric and variant == @variant and baseline == @baseline "
        "and layer >= 0 and head == -1"
    )
    return sel.sort_values("layer")


def _line(ax, label: str):
    (line,) = [x for x in ax.lines if x.get_label() == label]
    return line


def test_plot_layers_draws_each_value_interval_and_baseline(comparison, metrics):
    fig = comparison.plot_layers()
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "SimAOU (normalised)",
        "SimAOU (unnormalised)",
        "SimAM (after)",
        "SimAM (before)",
        "SimAM (changes)",
        "Kendall (tau_b)",
    ]
    colours = {}
    for ax, title in zip(fig.axes, titles, strict=True):
        metric, variant = title.lower().replace(")", "").split(" (")
        obs = _rows(metrics, metric, variant)
        value = _line(ax, "value")
        np.testing.assert_array_equal(value.get_xdata(), obs["layer"])
        np.testing.assert_allclose(value.get_ydata(), obs["value"])
        # the band spans exactly the bootstrap interval at each layer
        band = ax.collections[0].get_paths()[0].vertices
        for layer, low, high in zip(obs["layer"], obs["ci_low"], obs["ci_high"], strict=True):
            ys = band[np.isclose(band[:, 0], layer), 1]
            assert ys.min() == pytest.approx(low) and ys.max() == pytest.approx(high)
        names = set(metrics.query("metric == @metric and variant == @variant")["baseline"])
        for name in names - {"none"}:
            line = _line(ax, name)
            assert line.get_linestyle() == "--"
            np.testing.assert_allclose(
                line.get_ydata(), _rows(metrics, metric, variant, name)["value"]
            )
            colours.setdefault(name, set()).add(line.get_color())
        assert [t.get_text() for t in ax.get_xticklabels()] == ["L0", "L1", "L2"]
    assert all(len(c) == 1 for c in colours.values())  # one colour per baseline everywhere
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["value", "95% CI"] and set(legend[2:]) == set(colours)


def test_plot_layers_only_and_errors(comparison):
    fig = comparison.plot_layers(only=["kendall"])
    assert [ax.get_title() for ax in fig.axes] == ["Kendall (tau_b)"]
    overall = ila.rec2ftp(zsl=[0, 1, 1], icl=[1, 1, 0], ft=[1, 0, 1]).to_frame()
    with pytest.raises(ValueError, match="no per-layer rows"):
        plot_layers(overall)


def test_comparison_plot_heads_is_simam_per_head(comparison, metrics):
    fig = comparison.plot_heads()
    grids = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in grids] == [
        "SimAM (after) per head",
        "SimAM (before) per head",
        "SimAM (changes) per head",
    ]
    for ax, variant in zip(grids, ("after", "before", "changes"), strict=True):
        rows = metrics.query(f"metric == 'simam' and variant == '{variant}' and baseline == 'none'")
        expected = rows.query("head >= 0 and layer >= 0").pivot(
            index="layer", columns="head", values="value"
        )
        np.testing.assert_allclose(ax.images[0].get_array(), expected.to_numpy())
        assert [t.get_text() for t in ax.get_yticklabels()] == ["L0", "L1", "L2"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["H0", "H1", "H2", "H3"]
        lo, hi = ax.images[0].get_clim()
        values = expected.to_numpy()
        if values.min() < 0 < values.max():  # both signs: diverging, centred at 0
            assert lo == pytest.approx(-hi) and hi == pytest.approx(abs(values).max())
        else:
            assert (lo, hi) == pytest.approx((values.min(), values.max()))
    with pytest.raises(ValueError, match="no per-head rows"):
        comparison.plot_heads(only=["simaou"])


def test_decomposition_plot_heads(dec):
    frame = dec.to_frame()
    fig = dec.plot_heads()
    grids = [ax for ax in fig.axes if ax.images]
    titles = [ax.get_title().replace("\n", " ") for ax in grids]
    assert titles == [
        "attention mass on demonstrations",
        "relaxation gap 1 - cos(relaxed, softmax)",
        "|dW_ICL q| / |W_ZSL q|",
        "dW_ICL q effect on the label logit difference",
    ]
    mean = frame.groupby(["layer", "head"]).mean(numeric_only=True)
    expected = {
        0: mean["demo_mass"],
        1: 1 - mean["relax_cos"],
        2: mean["icl_norm_ratio"],
        3: mean["icl_effect"],
    }
    for i, series in expected.items():
        grid = series.unstack("head").to_numpy()
        np.testing.assert_allclose(grids[i].images[0].get_array(), grid, rtol=1e-12)
    # any numeric column, and an error that lists them
    fig = dec.plot_heads(["zsl_norm"])
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(), mean["zsl_norm"].unstack("head").to_numpy()
    )
    with pytest.raises(KeyError, match="choose from"):
        dec.plot_heads(["nope"])


def test_plot_accuracy_bars(tmp_path):
    fig = plot_accuracy({"zsl": 0.5, "icl": 0.9, "ft": float("nan")}, {"zsl": 0.4, "icl": 0.45})
    bars = fig.axes[0].patches
    widths = [p.get_width() for p in bars]
    np.testing.assert_allclose(widths[:2] + widths[3:5], [0.5, 0.9, 0.4, 0.45])
    assert np.isnan(widths[2]) and np.isnan(widths[5])  # no value, no bar
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "0.900" in labels and "n/a" in labels
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["ZSL", "ICL", "FT"]


def test_svg_is_reproducible_escaped_and_fetches_nothing(metrics):
    evil = metrics.assign(baseline=metrics["baseline"].replace("random_uniform", "<b>$x$ & y"))
    first, second = svg(plot_layers(evil)), svg(plot_layers(evil))
    assert first == second  # fixed ids, no date: the same page twice
    assert first.startswith("<svg") and "<?xml" not in first and "dc:date" not in first
    assert "<b>" not in first and "&lt;b&gt;$x$ &amp; y" in first  # shown literally
    assert not re.search(r"(src|href|@import|url)\W*\(?['\"]?https?:", first)


def test_figures_show_in_a_notebook(comparison):
    fig = comparison.plot_layers()
    assert isinstance(fig, NotebookFigure)
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"


def test_momentum_figure_draws_each_seed_and_the_mean():
    config = StudyConfig(variants=("vanilla", "eta0.5"), seeds=(0, 1, 2), shots=(0, 4))
    runs = []
    for v, variant in enumerate(config.variants):
        for seed in config.seeds:
            icl = {
                g: {"0": 50.0 + seed, "4": 60.0 + 10 * v + seed}
                for g in ("overall", "canonical", "arbitrary")
            }
            runs.append({"variant": variant, "seed": seed, "val_ppl": 3.0 + v + 0.1 * seed,
                         "val_loss": 1.0, "val_label_loss": 1.0, "icl": icl})  # fmt: skip
    fig = momentum_figure(runs, config)
    ax = fig.axes[0]
    assert ax.get_title() == "validation perplexity (lower is better)"
    for j, variant in enumerate(config.variants):
        expected = [r["val_ppl"] for r in runs if r["variant"] == variant]
        dots = ax.collections[3 * j].get_offsets()  # per variant: dots, mean bar, whisker
        np.testing.assert_allclose(dots[:, 1], expected)
        bar = ax.collections[3 * j + 1].get_segments()[0]
        whisker = ax.collections[3 * j + 2].get_segments()[0]
        mean, std = statistics.fmean(expected), statistics.stdev(expected)
        np.testing.assert_allclose(bar[:, 1], [mean, mean])
        np.testing.assert_allclose(whisker[:, 1], [mean - std, mean + std])
        label = ax.get_xticklabels()[j].get_text()
        assert label == f"{variant}\n{mean:.3f}"
    k4 = fig.axes[2]
    assert k4.get_title() == "ICL accuracy %, all instances, k=4"
    assert [line.get_ydata()[0] for line in k4.lines if line.get_linestyle() == "--"] == [50.0]


@pytest.mark.parametrize(
    "name",
    [
        "views.page",
        "views.figures",
        "views.heatmaps",
        "views.meta_gradients",
        "views.attention",
        "views.run_data",
        "views.report",
        "study.duality",
        "study.comparison",
    ],
)
def test_docstring_examples_run(name):
    module = importlib.import_module("icl_lens." + name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_viz_namespace_lists_what_it_exports():
    assert all(hasattr(viz, name) for name in viz.__all__)
