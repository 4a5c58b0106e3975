"""Views of the interventions study: the per-head heatmaps and the top-k curves draw the
frame's values (a synthetic frame in INTERVENE.md's schema), and the transplant view's
per-token terms are exactly what Transplant({h}, linear) adds to the head, with q from
the Blind forward, on four architectures."""

from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pandas as pd
import pytest
import torch
from icl_lens.hooks import interventions as iv
from icl_lens.hooks.intervention_runner import InterventionRunner

import icl_lens as il
from icl_lens.views import interventions as views
from icl_lens.views.meta_gradients import MetaGradients
from tests.models import ARCHITECTURES, make_model, make_tokenizer

TOL = 1e-5
BROKEN = 100 * TOL
DEMOS = ["Sentence: w1 w2 w3 Label: good", "Sentence: w4 w5 Label: bad", "Sentence: w6 Label: good"]
QUERY = "Sentence: w7 w8 Label:"
HEAD_PANELS = [
    ("knockout", "", "removed"),
    ("restore", "", "recovered"),
    ("transplant", "linear", "recovered"),
    ("transplant", "fitted", "recovered"),
]
CURVES = {
    "Restore(top-k)": ("restore", "", "recovered", 0),
    "Transplant(top-k, linear)": ("transplant", "linear", "recovered", 0),
    "Transplant(top-k, fitted)": ("transplant", "fitted", "recovered", 0),
    "Knockout(top-k)": ("knockout", "", "removed", 1),
}


# ---------------------------------------------------------------------------------------
# a frame in INTERVENE.md's schema, every scope and control, values drawn
# ---------------------------------------------------------------------------------------


def synthetic_frame(n_layers=3, n_heads=4, seed=0, undefined=((2, 3),)) -> pd.DataFrame:
    """One row per value, as ``Interventions.frame``: conditions, per head, per layer,
    all heads, top-k and random-k curves (3 draws each), the controls, FT's and the task
    vector's recovery; the heads in ``undefined`` NaN with a flag."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(intervention, form, scope, layer, head, k, control, metric, quantity, value,
            flag=None):  # fmt: skip
        label = {"head": f"L{layer}H{head}", "layer": f"L{layer}"}.get(scope, "all")
        ci = 0.05 + 0.1 * rng.random()
        rows.append({
            "intervention": intervention, "form": form, "scope": scope, "layer": layer,
            "head": head, "k": k, "control": control, "metric": metric, "quantity": quantity,
            "value": value, "ci_low": value - ci, "ci_high": value + ci * 1.5,
            "n_queries": 32, "flag": flag, "head_label": label,
        })  # fmt: skip

    for metric in ("margin", "accuracy"):
        for condition in ("icl", "blind", "zsl", "zsl_same_positions", "ft", "task_vector"):
            add(condition, "", "model", -1, -1, -1, "none", metric, "value", rng.random())
        add("ft", "", "model", -1, -1, -1, "none", metric, "recovered", 0.42)
        add("task_vector", "", "model", -1, -1, -1, "none", metric, "recovered", 0.31)
        for layer in range(n_layers):
            for head in range(n_heads):
                nan = (layer, head) in undefined
                for intervention, form, quantity in HEAD_PANELS:
                    value = math.nan if nan else float(rng.normal(0.2, 1.0))
                    flag = "ICL does not move the margin beyond its interval" if nan else None
                    add(intervention, form, "head", layer, head, -1, "none", metric, quantity,
                        value, flag)  # fmt: skip
                    add(intervention, form, "head", layer, head, -1, "permuted_labels", metric,
                        quantity, 10 + rng.random())  # fmt: skip
            for intervention, form, quantity in HEAD_PANELS:
                add(intervention, form, "layer", layer, -1, -1, "none", metric, quantity,
                    rng.random())  # fmt: skip
        for form in ("linear", "fitted", "softmax"):
            for control in ("none", "permuted_labels", "other_task", "random_update"):
                add("transplant", form, "model", -1, -1, -1, control, metric, "recovered",
                    rng.random())  # fmt: skip
        for k in (1, 2, 4, 8, n_layers * n_heads):
            for intervention, form, quantity in HEAD_PANELS:
                add(intervention, form, "top_k", -1, -1, k, "none", metric, quantity,
                    rng.random())  # fmt: skip
                for _ in range(3):
                    add(intervention, form, "random_k", -1, -1, k, "random_heads", metric,
                        quantity, rng.random())  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame()


def _pick(frame, **where) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        keep &= (frame[column] == value).to_numpy()
    return frame[keep]


# ---------------------------------------------------------------------------------------
# plot_heads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["margin", "accuracy"])
def test_plot_heads_draws_each_heads_value(frame, metric):
    fig = views.plot_heads(frame, metric=metric)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 4
    for ax, (intervention, form, quantity) in zip(axes, HEAD_PANELS, strict=True):
        rows = _pick(frame, scope="head", control="none", metric=metric,
                     intervention=intervention, form=form, quantity=quantity)  # fmt: skip
        want = rows.pivot(index="layer", columns="head", values="value").to_numpy()
        image = ax.images[0]
        got = np.ma.filled(image.get_array().astype(float), np.nan)
        np.testing.assert_array_equal(got, want)  # NaN where the frame has NaN
        low, high = image.get_clim()
        assert low == -high and high >= np.nanmax(np.abs(want))  # diverging, centred at 0
        assert image.get_cmap()(np.nan)[:3] != image.get_cmap()(0.5)[:3]  # NaN has its colour
        assert quantity in image.colorbar.ax.get_ylabel()
        assert [t.get_text() for t in ax.texts].count("n/a") == 1  # the undefined head
    note = fig.get_suptitle()
    assert f"fraction of ICL's effect on the {metric}" in note and "undefined" in note


def test_plot_heads_of_a_control_and_without_undefined_cells():
    frame = synthetic_frame(undefined=())
    fig = views.plot_heads(frame, control="permuted_labels")
    values = fig.axes[0].images[0].get_array()
    assert values.min() >= 10  # the control's rows, not the real demonstrations'
    assert "undefined" not in fig.get_suptitle()
    assert not any(t.get_text() == "n/a" for ax in fig.axes for t in ax.texts)


def test_plot_heads_refuses_what_it_cannot_draw(frame):
    with pytest.raises(ValueError, match="lacks the columns .*'quantity'"):
        views.plot_heads(frame.drop(columns="quantity"))
    with pytest.raises(ValueError, match="metric 'logit' is not in the frame; choose"):
        views.plot_heads(frame, metric="logit")
    with pytest.raises(ValueError, match="no head scan .*head_scan=True for the heatmaps"):
        views.plot_heads(frame[frame["scope"] != "head"])  # as head_scan=False leaves it
    with pytest.raises(ValueError, match="no per-head rows for metric 'margin' and control"):
        views.plot_heads(frame, control="other_task_nowhere")
    with pytest.raises(ValueError, match="head L0H0 has several values"):
        views.plot_heads(pd.concat([frame, frame]))
    with pytest.raises(TypeError, match="Interventions"):
        views.plot_heads({"frame": frame})


# ---------------------------------------------------------------------------------------
# plot_curve
# ---------------------------------------------------------------------------------------


def test_plot_curve_draws_top_k_random_heads_and_references(frame):
    fig = views.plot_curve(frame)
    left, right = (ax for ax in fig.axes if ax.get_title())
    for label, (intervention, form, quantity, side) in CURVES.items():
        ax = (left, right)[side]
        rows = _pick(frame, scope="top_k", metric="margin", intervention=intervention,
                     form=form, quantity=quantity).sort_values("k")  # fmt: skip
        (line,) = [x for x in ax.lines if x.get_label() == label]
        assert line.get_xdata().tolist() == rows["k"].tolist()
        np.testing.assert_allclose(line.get_ydata(), rows["value"])
        # the error bars run from ci_low to ci_high
        (bars,) = [c for c in ax.containers if c.get_label() == f"_{label} 95% CI"]
        ends = [(s[0][1], s[1][1]) for s in bars.lines[2][0].get_segments()]
        np.testing.assert_allclose(ends, list(zip(rows["ci_low"], rows["ci_high"], strict=True)))
        # the random heads: the mean of the three draws per k, dashed, same colour
        random = _pick(frame, scope="random_k", metric="margin", intervention=intervention,
                       form=form, quantity=quantity)  # fmt: skip
        mean = random.groupby("k")["value"].mean()
        colour = line.get_color()
        dashed = [x for x in ax.lines if x.get_linestyle() == "--" and x.get_color() == colour]
        assert len(dashed) == 1
        np.testing.assert_allclose(dashed[0].get_ydata(), mean.to_numpy())
    flat = {round(float(x.get_ydata()[0]), 6) for x in left.lines if x.get_linestyle() == ":"}
    assert flat == {0.42, 0.31}  # FT's and the task vector's recovery
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "FT recovered" in labels and "task vector recovered" in labels
    assert any(t.startswith("k random heads") for t in labels)
    assert [t.get_text() for t in left.get_xticklabels()] == ["1", "2", "4", "8", "12"]


def test_plot_curve_scales_to_the_values_not_a_far_wider_interval(frame):
    wide = frame.copy()
    row = wide.index[(wide["scope"] == "top_k") & (wide["intervention"] == "restore")][0]
    wide.loc[row, "ci_high"] = 100.0
    left = views.plot_curve(wide).axes[0]
    low, high = left.get_ylim()
    curves = wide[(wide["scope"] == "top_k") & (wide["metric"] == "margin")]
    assert high < 10 and high >= max(1.0, curves["value"].max())
    assert low <= min(0.0, curves["value"].min())


def test_plot_curve_refuses_a_frame_without_curves(frame):
    with pytest.raises(ValueError, match="no top-k rows"):
        views.plot_curve(frame[~frame["scope"].isin(["top_k", "random_k"])])
    with pytest.raises(ValueError, match="metric 'logit' is not in the frame"):
        views.plot_curve(frame, metric="logit")


# ---------------------------------------------------------------------------------------
# the transplant view: decompose under Blind is what Transplant({h}, linear) adds
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ARCHITECTURES)
def setup(request):
    model, _ = make_model(request.param)
    tok = make_tokenizer()
    prompt = il.build_prompt(tok, DEMOS, QUERY, separator=" \n")
    return il.adapt(model), prompt, tuple(tok.convert_tokens_to_ids(["bad", "good"]))


def test_decompose_under_blind_is_the_linear_transplants_term(setup):
    """Per layer: the head outputs under Transplant(that layer's heads, linear) minus
    Blind's are decompose(..., intervention=blind)'s dW_ICL q_t at the prediction
    position; the plain ICL decomposition's (q from the ICL forward) is not."""
    a, prompt, _ = setup
    dec = il.decompose(a, prompt, intervention=iv.blind(a))
    icl = il.decompose(a, prompt)
    runner = InterventionRunner(a, prompt.prefix, demo_mask=prompt.demo_mask[: prompt.query_start])
    query = prompt.tokens[prompt.query_start :]
    differs = 0.0
    for layer in range(a.n_layers):
        heads = torch.zeros(a.n_layers, a.n_heads, dtype=torch.bool)
        heads[layer] = True
        seen = {}

        def keep(z, hook=None, seen=seen):
            seen["z"] = z.detach().clone()

        interventions = [iv.blind(a), iv.transplant(a, heads, "linear")]
        runner.run([query], interventions, hooks=[(a.name(layer, "z"), keep)])
        z = seen["z"][:, -1].float()  # [blind | transplant, head, d_head]
        want = z[1] - z[0]
        scale = max(1.0, want.abs().max().item())
        assert (dec.icl[layer, :, 0] - want).abs().max() <= TOL * scale, layer
        assert (dec.z[layer, :, 0] - z[0]).abs().max() <= TOL * scale, layer  # Blind's z
        assert want.abs().max() > BROKEN
        differs = max(differs, (icl.icl[layer, :, 0] - want).abs().max().item())
    assert differs > BROKEN  # ICL's q is another q: the view must not use it
    assert dec.demo_mass.abs().max() == 0  # Blind reads no demonstration


def test_transplant_terms_add_up_to_the_update_on_the_label_direction(setup):
    a, prompt, labels = setup
    dec = il.decompose(a, prompt, label_tokens=labels, intervention=iv.blind(a))
    for layer, head in [(0, 1), (a.n_layers - 1, 2)]:
        mg = views.transplant_terms(a, prompt, layer, head, label_tokens=labels,
                                    labels=("bad", "good"), scale=0.5)  # fmt: skip
        assert mg.kind == "transplant" and mg.stats["fitted_scale"] == 0.5
        effect = torch.tensor(mg.values["push toward good vs bad"], dtype=torch.float64)
        demo = torch.tensor(mg.is_demo)
        assert effect[~demo].abs().max() == 0  # BOS and the query: not in the update
        update = dec.head_to_resid(layer, head, 0, dec.icl[layer, head, 0])
        want = float(update @ dec.label_direction[layer, 0])
        assert abs(effect.sum().item() - want) <= TOL * max(1.0, abs(want))
        along = torch.tensor(mg.values["along the update"], dtype=torch.float64)
        assert abs(along.sum().item() - update.norm().item()) <= TOL * max(1.0, update.norm())
        assert "attention" not in mg.values  # Blind's is zero on the demonstrations


def test_transplant_view_round_trip_and_refusals(setup):
    a, prompt, labels = setup
    mg = views.transplant_terms(a, prompt, 1, 0, label_tokens=labels)
    back = MetaGradients.from_dict(mg.to_dict())
    assert back.kind == "transplant" and back.values == mg.values
    view = views.view_transplant(back)
    assert [c.name for c in view.components] == ["ColoredTokensMulti"]
    assert "Transplanted update of head L1H0" in view.local_src
    assert "Meta-gradients of head" not in view.local_src
    direct = views.view_transplant(prompt, a, 1, 0, label_tokens=labels)
    assert direct.components[0].props == view.components[0].props
    icl = il.decompose(a, prompt)
    from icl_lens.views.meta_gradients import meta_gradients

    with pytest.raises(ValueError, match="ICL forward's meta-gradients"):
        views.view_transplant(meta_gradients(icl, 1, 0))
    with pytest.raises(ValueError, match="give the model whose"):
        views.view_transplant(prompt)
    with pytest.raises(ValueError, match="give the model, layer and head"):
        views.view_transplant(prompt, a)
    with pytest.raises(ValueError, match="kind must be one of"):
        MetaGradients.from_dict({**mg.to_dict(), "kind": "other"})


def test_decompose_refuses_a_transplant_or_another_models_intervention(setup):
    a, prompt, _ = setup
    with pytest.raises(ValueError, match="takes a knockout .*intervention=blind"):
        il.decompose(a, prompt, intervention=iv.transplant(a, [(0, 0)], "linear"))
    other = type("Shape", (), {"n_layers": a.n_layers + 1, "n_heads": a.n_heads})()
    with pytest.raises(ValueError, match="build it with this model's adapter"):
        il.decompose(a, prompt, intervention=iv.blind(other))
    with pytest.raises(TypeError, match="must be an Intervention"):
        il.decompose(a, prompt, intervention="blind")


# ---------------------------------------------------------------------------------------
# on a real result: il.intervene on the toy model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run():
    from icl_lens.toy import toy_task

    model = il.toy_model()
    task = toy_task(0, kind="arbitrary", n_validation=12)
    result = il.intervene(model, task, shots=4, seed=0, lr_grid="0.1", fit_queries=8,
                          n_resamples=50, progress=False)  # fmt: skip
    return model, result


def test_views_of_a_real_result(toy_run):
    model, result = toy_run
    heads = views.plot_heads(result, metric="accuracy")
    rows = _pick(result.frame, scope="head", control="none", metric="accuracy",
                 intervention="knockout", quantity="removed")  # fmt: skip
    want = rows.pivot(index="layer", columns="head", values="value").to_numpy()
    got = np.ma.filled(heads.axes[0].images[0].get_array().astype(float), np.nan)
    np.testing.assert_array_equal(got, want)
    curve = views.plot_curve(result)
    (line,) = [x for x in curve.axes[0].lines if x.get_label() == "Restore(top-k)"]
    assert line.get_xdata().tolist() == [1, 2, 4, 8, 12]


def test_transplant_of_a_measured_query(toy_run):
    model, result = toy_run
    tok = model.tokenizer
    prompt = views.query_prompt(result, 2, tok)
    assert prompt.tokens.tolist() == result.prompt.prefix.tolist() + result.queries[2].tolist()
    assert prompt.label == int(result.gold[2]) and len(prompt.str_tokens) == prompt.n_tokens
    mg = views.transplant_data(result, model, query=2)
    layer, head = result.ranking[0]  # default: the most necessary head
    assert (mg.layer, mg.head) == (layer, head)
    assert mg.stats["fitted_scale"] == pytest.approx(float(result.scales[layer, head]))
    gold = int(result.gold[2])
    words = [tok.decode([i]).strip() for i in result.label_ids]
    assert mg.labels == (words[1 - gold], words[gold])  # toward the gold label word
    # the same terms as transplant_terms on that prompt and the (other, gold) pair
    pair = (result.label_ids[1 - gold], result.label_ids[gold])
    again = views.transplant_terms(model, prompt, layer, head, label_tokens=pair)
    assert (
        again.values["label effect"] == mg.values[f"push toward {words[gold]} vs {words[1 - gold]}"]
    )
    view = result.view_transplant(model, layer, head, query=2)
    assert view.components[0].props["values"] == mg.view().components[0].props["values"]
    with pytest.raises(IndexError, match="a measured query"):
        views.query_prompt(result, len(result.queries), tok)
    with pytest.raises(ValueError, match="holds no prompt"):
        views.query_prompt(dataclasses.replace(result, prompt=None), 0, tok)
    with pytest.raises(ValueError, match="give both layer and head"):
        views.transplant_data(result, model, layer=0)


def test_docstring_examples_run():
    result = doctest.testmod(views, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
