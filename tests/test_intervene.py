"""``il.intervene`` (issue 21, docs/interventions.md): the run-time identities in the
result and the exact shares they give, the fitted scales against least squares on head
outputs captured here, the linear-attention identity, held-out fit queries, the
controls, the task vector against patching by hand, intervals over sets against the
hierarchical machinery called directly, undefined shares, refusals, and ``icl-lens run
--interventions`` (writes, prints, resumes, reuses the comparison's stages)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from icl_lens.analyses import hierarchical_bootstrap
from icl_lens.analyses.hierarchical import interval_over_sets, run_tree
from icl_lens.analyses.summary import _resample_counts
from icl_lens.hooks import interventions as iv
from icl_lens.hooks.intervention_runner import InterventionRunner

import icl_lens as il
import icl_lens.study.intervention_stages as STAGES  # noqa: N812 - the stages intervene runs
import icl_lens.study.pipeline as PIPELINE  # noqa: N812
from icl_lens.cli import main
from icl_lens.data.prompts import encode
from icl_lens.data.tasks import Example, Task
from icl_lens.study.intervention_frame import condition, intervention_frame
from icl_lens.study.intervention_inputs import fit_examples
from icl_lens.study.plan import plan_study
from icl_lens.sweep.grid import Grid, _options, run_parser
from icl_lens.toy import toy_task
from tests.models import make_hf_model, make_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task
from tests.test_interventions_hooks import linear_attention

SETTINGS = il.StudySettings(
    shots=8,
    max_queries=32,
    fit_queries=16,
    lr_grid="0.3,1,3",
    lr_extend=0,
    retest=False,
    control=False,
)
"""The toy study: 8 demonstrations of a held-out instance (ICL 0.5 -> 1.0), 32 queries."""


def toy_instance() -> Task:
    return toy_task(5, kind="arbitrary")


@pytest.fixture(scope="module")
def toy():
    model = il.toy_model()
    return model, toy_instance(), il.intervene(model, toy_instance(), SETTINGS, progress=False)


def rows(frame: pd.DataFrame, **where) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        keep &= (frame[column] == value).to_numpy()
    return frame[keep]


def one(frame: pd.DataFrame, **where) -> pd.Series:
    found = rows(frame, **{"scope": "model", "control": "none", **where})
    assert len(found) == 1, where
    return found.iloc[0]


def column(res, **where) -> int:
    """The label-logits column of one condition (no draws)."""
    c = res.conditions
    keep = np.ones(len(c), dtype=bool)
    for key, value in {"scope": "model", "control": "none", **where}.items():
        keep &= (c[key] == value).to_numpy()
    (index,) = np.flatnonzero(keep)
    return int(index)


class ForwardCount:
    """Calls of the model's forward (every forward pass, FT's steps included)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1

    def close(self):
        self.handle.remove()


# ---- the identities and the exact shares ------------------------------------------------


def test_run_time_identities_hold_and_give_exact_shares(toy):
    _, _, res = toy
    f, gaps = res.frame, res.info["identities"]
    size = float(res.label_logits[:, column(res, intervention="icl")].abs().max())
    assert max(gaps.values()) <= STAGES.IDENTITY_TOLERANCE * max(1.0, size)
    for metric in ("margin", "accuracy"):
        icl = one(f, intervention="icl", metric=metric, quantity="value")["value"]
        blind = one(f, intervention="blind", metric=metric, quantity="value")["value"]
        restore = one(f, intervention="restore", metric=metric, quantity="value")["value"]
        knockout = one(f, intervention="knockout", metric=metric, quantity="value")["value"]
        assert restore == icl and knockout == blind
        assert one(f, intervention="restore", metric=metric, quantity="recovered")["value"] == 1.0
        assert one(f, intervention="knockout", metric=metric, quantity="removed")["value"] == 1.0
    soft = one(f, intervention="transplant", form="softmax", metric="margin", quantity="recovered")
    assert abs(soft["value"] - 1.0) <= 1e-5  # computed, not copied: equal to float noise
    lin = one(f, intervention="transplant", form="linear", metric="margin", quantity="recovered")
    assert abs(lin["value"] - 1.0) > 1e-3  # softmax attention is not the relaxed form


def test_a_failed_identity_stops_the_study(monkeypatch):
    """Negative control: Restore(all) built as a one-head knockout breaks its identity."""
    real = iv.restore

    def wrong(adapter, heads):
        return iv.knockout(adapter, [(0, 0)]) if isinstance(heads, str) else real(adapter, heads)

    monkeypatch.setattr(iv, "restore", wrong)
    with pytest.raises(STAGES.IdentityError, match=r"restore\(all\) == icl failed"):
        il.intervene(il.toy_model(), toy_instance(), SETTINGS, progress=False)


# ---- the fitted scales ------------------------------------------------------------------


def test_fitted_scales_are_least_squares_on_captured_head_outputs(toy):
    """c_h from hook_z captured here on full forwards (no cache), one query at a time:
    dz = z(Restore(layer)) - z(Blind), u = z(Transplant(layer, linear)) - z(Blind)."""
    model, task, res = toy
    a = il.adapt(model)
    plan = plan_study(a, task, SETTINGS)
    runner = InterventionRunner(
        a, plan.prefix, demo_mask=plan.prompt.demo_mask[: plan.prompt.query_start], reuse=False
    )
    texts = res.info["fit_queries"]["texts"]
    queries = [torch.tensor(encode(model.tokenizer, t)) for t in texts]
    for layer in range(a.n_layers):
        heads = [(layer, h) for h in range(a.n_heads)]
        rows3 = [iv.blind(a), iv.restore(a, heads), iv.transplant(a, heads, "linear")]
        dz, u = [], []
        for q in queries:
            seen = []
            keep = (a.name(layer, "z"), lambda z, hook=None, seen=seen: seen.append(z[:, -1]))
            runner.run([q], rows3, batch_size=1, hooks=[keep])
            blind, read, moved = (x[0].double() for x in seen)
            dz.append(read - blind)
            u.append(moved - blind)
        dz, u = torch.stack(dz), torch.stack(u)  # query head d_head
        for h in range(a.n_heads):
            want = torch.linalg.lstsq(u[:, h].reshape(-1, 1), dz[:, h].reshape(-1, 1)).solution
            got = res.scales[layer, h].item()
            assert abs(got - want.item()) <= 1e-4 * max(1e-3, abs(want.item())), (layer, h)
    assert not torch.allclose(res.scales, torch.ones_like(res.scales))


def test_under_linear_attention_the_linear_transplant_is_exact(monkeypatch):
    """Softmax replaced by the raw scores at the query positions: ICL is then exactly
    Blind + dW_ICL q, so Transplant(all, linear) recovers 1 and every c_h is 1. (The
    softmax transplant's identity does not hold for such a model: it is left out of the
    run-time check here.)"""
    real_run, real_check = InterventionRunner.run, STAGES._identities

    def run(self, queries, interventions, *, hooks=(), **kw):
        lin = linear_attention(self.adapter, len(self.prefix))
        return real_run(self, queries, interventions, hooks=[*lin, *hooks], **kw)

    monkeypatch.setattr(InterventionRunner, "run", run)
    monkeypatch.setattr(
        STAGES, "_identities", lambda f: real_check(torch.cat([f[:, :6], f[:, :1]], 1))
    )
    res = il.intervene(
        il.toy_model(), toy_instance(), SETTINGS.replace(fit_queries=8), progress=False
    )
    assert torch.allclose(res.scales, torch.ones_like(res.scales), atol=1e-5)
    f = res.frame
    for form in ("linear", "fitted"):
        share = one(f, intervention="transplant", form=form, metric="margin", quantity="recovered")
        assert abs(share["value"] - 1.0) <= 1e-5 and share["flag"] is None
    icl = res.label_logits[:, column(res, intervention="icl")]
    linear = res.label_logits[:, column(res, intervention="transplant", form="linear")]
    assert (linear - icl).abs().max() <= 1e-5 * icl.abs().max()
    blind = res.label_logits[:, column(res, intervention="blind")]
    assert (blind - icl).abs().max() > 1.0  # the demonstrations matter here


# ---- held-out fit queries and the controls ----------------------------------------------


def test_fit_queries_are_neither_measured_nor_demonstrations(toy):
    model, task, res = toy
    a = il.adapt(model)
    plan = plan_study(a, task, SETTINGS)
    fmt = task.spec.format_query
    fit = res.info["fit_queries"]["texts"]
    assert len(set(fit)) == len(fit) == res.info["fit_queries"]["used"] == 16
    assert not set(fit) & {fmt(e) for e in plan.validation}
    assert not set(fit) & {fmt(e) for e in plan.ft_demos}
    # a training example with a measured query's text is held out too
    copies = [Example(dict(e.fields), e.label) for e in task.validation[:6]]
    twin = Task(task.spec, [*task.train, *copies], task.validation, dict(task.info))
    twin_plan = plan_study(a, twin, SETTINGS)
    held = fit_examples(twin_plan, 100)
    assert len(held) == len(task.train) - SETTINGS.shots
    assert not {fmt(e) for e in held} & {fmt(e) for e in task.validation}


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """A run with its control prefixes and random updates recorded, checkpointed."""
    seen = {"prefixes": [], "updates": []}
    real_prefix, real_update = STAGES.control_prefix, iv.added_update

    def control_prefix(adapter, plan, demos, spec=None):
        out = real_prefix(adapter, plan, demos, spec)
        seen["prefixes"].append((demos, spec, out))
        return out

    def added_update(adapter, heads, update, **kw):
        seen["updates"].append(update)
        return real_update(adapter, heads, update, **kw)

    model = il.toy_model()
    out = tmp_path_factory.mktemp("spied")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(STAGES, "control_prefix", control_prefix)
        m.setattr(iv, "added_update", added_update)
        res = il.intervene(model, toy_instance(), SETTINGS, checkpoint_dir=out, progress=False)
    return model, res, seen, out


def test_the_permuted_label_control_changes_every_label(spied):
    model, res, seen, _ = spied
    plan = plan_study(il.adapt(model), toy_instance(), SETTINGS)
    (demos, spec, prefix), _ = seen["prefixes"]
    assert spec is None and len(demos) == len(plan.demos) == 8
    assert all(d.label != e.label for d, e in zip(demos, plan.demos, strict=True))
    assert [d.fields for d in demos] == [e.fields for e in plan.demos]
    want = il.task_prompt(model.tokenizer, plan.spec, demos, plan.validation[0]).prefix
    assert torch.equal(prefix.prefix, want) and not torch.equal(prefix.prefix, plan.prefix)
    assert res.info["controls"]["permuted_labels"]["permutation"] == [1, 0]


def test_the_other_task_control_is_another_toy_instance(spied):
    model, res, seen, _ = spied
    _, (demos, spec, prefix) = seen["prefixes"]
    assert spec.name == "toy-6" and spec.label_words != toy_instance().spec.label_words
    assert res.info["controls"]["other_task"]["task"] == "toy-6"
    assert rows(res.frame, control="other_task", quantity="recovered").shape[0] == 8


def test_the_random_update_has_the_norm_of_dW_ICL(spied):
    model, res, seen, _ = spied
    plan = plan_study(il.adapt(model), toy_instance(), SETTINGS)
    dec = il.decompose(model, plan.prompt, matrices=True)  # dW_ICL at the prediction position
    want = torch.linalg.matrix_norm(dec.dW_ICL[:, :, 0].double())
    linear = seen["updates"][0::2]  # per draw: as is, then times c_h
    assert len(linear) == STAGES.N_RANDOM_DRAWS
    for update in linear:
        assert torch.allclose(torch.linalg.matrix_norm(update.double()), want, rtol=1e-4)
    assert not torch.allclose(linear[0], linear[1])
    fitted = seen["updates"][1]
    assert torch.allclose(fitted, res.scales[..., None, None] * linear[0])


def test_an_update_of_dW_ICL_is_the_linear_transplant(toy):
    """added_update with each head's dW_ICL = sum_i v_i k_i^T (from decompose) acts as
    Transplant(all, linear); with another layer's matrices it does not."""
    model, task, _ = toy
    a = il.adapt(model)
    plan = plan_study(a, task, SETTINGS)
    dW = il.decompose(model, plan.prompt, matrices=True).dW_ICL[:, :, 0].float()
    runner = InterventionRunner(
        a, plan.prefix, demo_mask=plan.prompt.demo_mask[: plan.prompt.query_start]
    )
    rows4 = [
        iv.transplant(a, "all", "linear"),
        iv.added_update(a, "all", dW),
        iv.added_update(a, "all", dW.roll(1, dims=0)),
        iv.blind(a),
    ]
    out = runner.run(plan.queries[:4], rows4).logits
    size = out[:, 0].abs().max()
    assert (out[:, 1] - out[:, 0]).abs().max() <= 1e-5 * size
    assert (out[:, 2] - out[:, 0]).abs().max() > 1e-2 * size
    assert (out[:, 3] - out[:, 0]).abs().max() > 1e-2 * size


# ---- the task vector ------------------------------------------------------------------------


@torch.no_grad()
def test_the_task_vector_is_patching_by_hand(toy):
    """Hendel et al.'s task vector by hand: the ICL forward's resid_post at the last
    position averaged over the fit queries, written into the plain zero-shot forward of
    each measured query at the same layer and position; the layer chosen on the fit
    queries by accuracy, then margin."""
    model, task, res = toy
    a = il.adapt(model)
    plan = plan_study(a, task, SETTINGS)
    fit = [torch.tensor(encode(model.tokenizer, t)) for t in res.info["fit_queries"]["texts"]]
    fit_gold = [e.label for e in fit_examples(plan, SETTINGS.fit_queries)]
    labels = list(res.label_ids)

    def icl_residual(layer):
        name = f"blocks.{layer}.hook_resid_post"
        got = []
        for q in fit:
            _, cache = model.run_with_cache(torch.cat([plan.prefix, q])[None], names_filter=name)
            got.append(cache[name][0, -1])
        return torch.stack(got).mean(0)

    def patched(layer, vector, queries):
        name = f"blocks.{layer}.hook_resid_post"

        def put(x, hook=None):
            x = x.clone()
            x[0, -1] = vector
            return x

        out = [
            model.run_with_hooks(torch.cat([plan.prefix[:1], q])[None], fwd_hooks=[(name, put)])[
                0, -1
            ]
            for q in queries
        ]
        return torch.stack(out)[:, labels]

    accuracy, margin = [], []
    for layer in range(a.n_layers):
        x = patched(layer, icl_residual(layer), fit)
        gold = torch.tensor(fit_gold)
        accuracy.append(float((x.argmax(-1) == gold).float().mean()))
        margin.append(
            float((x[torch.arange(len(gold)), gold] - x[torch.arange(len(gold)), 1 - gold]).mean())
        )
    best = max(range(a.n_layers), key=lambda i: (accuracy[i], margin[i], -i))
    assert res.task_vector_layer == best
    assert res.info["task_vector"]["accuracy_on_fit"] == pytest.approx(accuracy)
    want = patched(best, icl_residual(best), plan.queries)
    got = res.label_logits[:, column(res, intervention="task_vector", layer=best)]
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    zsl = res.label_logits[:, column(res, intervention="zsl")]
    assert (got - zsl).abs().max() > 1e-2  # the patch acts


# ---- intervals over sets, undefined shares --------------------------------------------------


def test_intervals_over_three_sets_are_the_hierarchical_ones():
    runs = il.intervene_runs(
        il.toy_model(),
        toy_instance(),
        seeds=(1, 2, 3),
        shots=4,
        max_queries=24,
        fit_queries=8,
        lr_grid="1",
        lr_extend=0,
        retest=False,
        control=False,
        progress=False,
    )
    table = runs.table(n_resamples=400)
    per_set = []
    for r in runs.runs.values():
        x, g = r.label_logits.double(), r.gold
        n = torch.arange(len(g))
        per_set.append((x[n, :, g] - x[n, :, 1 - g]).numpy())  # margin, two label words
    icl = column(runs.runs[1], intervention="icl")
    blind = column(runs.runs[1], intervention="blind")
    fitted = column(runs.runs[1], intervention="transplant", form="fitted")
    direct = hierarchical_bootstrap(
        {(s,): m[:, icl] for s, m in zip((1, 2, 3), per_set, strict=True)}, n_resamples=400
    )
    got = one(table, intervention="icl", metric="margin", quantity="value")
    assert got["value"] == pytest.approx(direct.value, abs=1e-12)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(direct.ci, abs=1e-12)
    assert got["n_sets"] == 3 and got["flag"] is None
    # a share: per set a ratio of means on the same query resamples, into the t interval
    w = _resample_counts(24, 400, 0) / 24
    point = np.array(
        [
            [(m[:, fitted].mean() - m[:, blind].mean()) / (m[:, icl].mean() - m[:, blind].mean())]
            for m in per_set
        ]
    )
    reps = np.stack(
        [
            ((w @ m[:, fitted]) - (w @ m[:, blind])) / ((w @ m[:, icl]) - (w @ m[:, blind]))
            for m in per_set
        ],
        axis=1,
    )[..., None]
    value, low, high, _ = interval_over_sets(
        run_tree([(1,), (2,), (3,)]), point, reps, np.array([24]), True, 0.95
    )
    got = one(
        table, intervention="transplant", form="fitted", metric="margin", quantity="recovered"
    )
    assert (got["value"], got["ci_low"], got["ci_high"]) == pytest.approx(
        (value[0], low[0], high[0]), abs=1e-12
    )
    # and the single set's frame is that set's share with its percentile interval
    single = one(
        runs.runs[2].frame,
        intervention="transplant",
        form="fitted",
        metric="margin",
        quantity="recovered",
    )
    assert single["value"] == pytest.approx(point[1, 0], abs=1e-12)


def test_a_tiny_effect_gives_an_undefined_flagged_share_not_a_huge_ratio():
    rng = np.random.default_rng(0)
    n = 40
    blind = rng.normal(size=(n, 2))
    icl = blind + rng.normal(scale=1e-9, size=(n, 2))  # ICL does not move the margin
    half = blind + 0.5
    logits = np.stack([icl, blind, half], axis=1)
    conditions = pd.DataFrame(
        [condition("icl"), condition("blind"), condition("restore", scope="layer", layer=0)]
    )
    f = intervention_frame([(logits, rng.integers(0, 2, size=n))], conditions, n_resamples=200)
    share = rows(f, intervention="restore", metric="margin", quantity="recovered").iloc[0]
    assert np.isnan(share["value"]) and np.isnan(share["ci_low"]) and np.isnan(share["ci_high"])
    assert share["flag"].startswith("undefined: ICL does not move the margin beyond its interval")
    # negative control: the same with a real effect is defined
    logits[:, 0] += np.array([[3.0, 0.0]])
    gold = np.zeros(n, dtype=int)
    f = intervention_frame([(logits, gold)], conditions, n_resamples=200)
    assert np.isfinite(
        rows(f, intervention="restore", metric="margin", quantity="recovered")["value"]
    ).all()


def test_where_demonstrations_cannot_matter_every_share_is_undefined(monkeypatch):
    """Attention outputs zeroed in every intervention forward: ICL equals Blind exactly,
    and no share against Blind is a number."""
    real_run = InterventionRunner.run

    def run(self, queries, interventions, *, hooks=(), **kw):
        zero = [
            (self.adapter.name(la, "attn_out"), lambda x, hook=None: x * 0)
            for la in range(self.adapter.n_layers)
        ]
        return real_run(self, queries, interventions, hooks=[*zero, *hooks], **kw)

    monkeypatch.setattr(InterventionRunner, "run", run)
    res = il.intervene(
        il.toy_model(), toy_instance(), SETTINGS.replace(fit_queries=8), progress=False
    )
    f = res.frame
    shares = rows(f, quantity="recovered").query(
        "intervention != 'ft' and intervention != 'task_vector'"
    )
    shares = pd.concat([shares, rows(f, quantity="removed")])
    assert len(shares) > 100 and shares["value"].isna().all()
    assert shares["flag"].str.startswith("undefined: ICL does not move the").all()
    icl = one(f, intervention="icl", metric="margin", quantity="value")["value"]
    assert one(f, intervention="blind", metric="margin", quantity="value")["value"] == icl


# ---- refusals ---------------------------------------------------------------------------------


def test_a_label_word_of_two_tokens_is_refused_before_any_forward(tmp_path):
    model, _ = make_model("gpt2")
    path = write_task(tmp_path / "two.jsonl", labels=("bad", "w1 good"))
    spec = il.TaskSpec("two", TEMPLATE, (" bad", " w1 good"), separator=" \n")
    task = il.load_task(path, spec=spec)
    count = ForwardCount(model)
    with pytest.raises(
        ValueError, match=r"every label word must be one token.*' w1 good' \(2 tokens\)"
    ):
        il.intervene(model, task, shots=4, progress=False)
    assert count.n == 0
    count.close()


def test_resuming_from_checkpoints_runs_no_forward(spied):
    model, res, _, out = spied
    count = ForwardCount(model)
    again = il.intervene(model, toy_instance(), SETTINGS, checkpoint_dir=out, progress=False)
    count.close()
    assert count.n == 0 and again.stages["computed"] == []
    assert torch.equal(again.label_logits, res.label_logits)
    pd.testing.assert_frame_equal(again.frame, res.frame)


# ---- the result as data -----------------------------------------------------------------------


def test_json_round_trip_and_the_frame_columns(toy, tmp_path):
    _, _, res = toy
    assert list(res.frame.columns) == [
        "intervention", "form", "scope", "layer", "head", "k", "control", "metric",
        "quantity", "value", "ci_low", "ci_high", "n_queries", "flag", "head_label",
    ]  # fmt: skip
    back = il.Interventions.from_json(res.to_json(tmp_path / "r.json"))
    pd.testing.assert_frame_equal(back.frame, res.frame)
    assert torch.equal(back.label_logits, res.label_logits) and back.ranking == res.ranking
    assert torch.equal(back.prompt.tokens, res.prompt.tokens) and back.info == json.loads(
        json.dumps(back.info)
    )
    pd.testing.assert_frame_equal(back.recompute_frame(seed=SETTINGS.seed), res.frame)


def test_the_views_are_thin_wrappers(toy, monkeypatch):
    """The view functions live in icl_lens.views.interventions (the views' helper); the
    methods pass the result through, imported when called."""
    _, _, res = toy
    calls = []
    fake = types.ModuleType("icl_lens.views.interventions")
    fake.plot_heads = lambda r, **kw: calls.append(("heads", r, kw))
    fake.plot_curve = lambda r, **kw: calls.append(("curve", r, kw))
    fake.view_transplant = lambda r, m, layer, head, query=0, **kw: calls.append(
        ("view", r, m, layer, head, query)
    )
    monkeypatch.setitem(sys.modules, "icl_lens.views.interventions", fake)
    res.plot_heads(), res.plot_curve(metric="accuracy"), res.view_transplant("M", 1, 2, query=3)
    assert calls == [
        ("heads", res, {}),
        ("curve", res, {"metric": "accuracy"}),
        ("view", res, "M", 1, 2, 3),
    ]


def test_toy_numbers_that_hold_on_any_cpu(toy):
    """ICL moves the toy from chance to every query right; the head scan's shares lie
    where they can (printed by pytest -s for the docs)."""
    _, _, res = toy
    f = res.frame
    assert one(f, intervention="icl", metric="accuracy", quantity="value")["value"] == 1.0
    assert one(f, intervention="zsl", metric="accuracy", quantity="value")["value"] <= 0.6
    fitted = one(f, intervention="transplant", form="fitted", metric="margin", quantity="recovered")
    assert 0.0 < fitted["ci_low"] and fitted["ci_high"] < 1.0
    curve = rows(f, scope="top_k", intervention="restore", metric="margin", quantity="recovered")
    assert curve["k"].tolist() == [1, 2, 4, 8, 12] and curve["value"].iloc[-1] == pytest.approx(
        1.0, abs=1e-5
    )
    shown = rows(f, metric="margin").query("quantity != 'value' and scope in ('model', 'top_k')")
    print(
        shown[
            ["intervention", "form", "scope", "k", "control", "value", "ci_low", "ci_high"]
        ].to_string()
    )


# ---- icl-lens run --interventions --------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_hf_model("gpt2").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root / "model", write_task(root / "two_class.jsonl")


def cli(files, out, *extra):
    model_dir, task_file = files
    return [
        "run", "--model", str(model_dir), "--task", str(task_file), "--template", TEMPLATE,
        "--shots", "4", "--out", str(out), "--lr-grid", "1e300,10", "--lr-extend", "0",
        "--max-queries", "10", "--control-draws", "1", "--quiet", *extra,
    ]  # fmt: skip


class Calls:
    """Calls of the interventions' forwards and of FT, across the CLI's own loading."""

    def __init__(self, monkeypatch):
        self.n = {"run": 0, "zero_shot": 0, "finetune": 0}
        for name in ("run", "zero_shot"):
            real = getattr(InterventionRunner, name)
            monkeypatch.setattr(InterventionRunner, name, self._wrap(name, real))
        monkeypatch.setattr(PIPELINE, "finetune", self._wrap("finetune", PIPELINE.finetune))
        import icl_lens.study.lr_search as lr_search

        monkeypatch.setattr(lr_search, "finetune", self._wrap("finetune", lr_search.finetune))

    def _wrap(self, name, real):
        def wrapped(*a, **kw):
            self.n[name] += 1
            return real(*a, **kw)

        return wrapped


def test_run_interventions_writes_prints_and_resumes(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(cli(files, out, "--interventions", "--fit-queries", "8")) == 0
    printed = capsys.readouterr().out
    assert "all heads, FT, task vector:" in printed and "top-k heads by necessity" in printed
    assert "transplant(fitted)" in printed and "[permuted_labels]" in printed
    res = il.Interventions.from_json(out / "interventions.json")
    assert res.info["fit_queries"]["used"] == 8 and len(res.gold) == 10
    assert len(pd.read_csv(out / "interventions.csv")) == len(res.frame)
    assert "no other-task control" in printed  # a local file has no default partner
    first = (out / "interventions.json").read_text()

    calls = Calls(monkeypatch)
    assert main(cli(files, out, "--interventions", "--fit-queries", "8")) == 0
    assert calls.n == {"run": 0, "zero_shot": 0, "finetune": 0}
    assert (out / "interventions.json").read_text() == first


def test_interventions_added_to_a_finished_run_reuse_its_stages(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(cli(files, out)) == 0
    assert not (out / "interventions.json").exists()
    calls = Calls(monkeypatch)
    assert main(cli(files, out, "--interventions", "--fit-queries", "8")) == 0
    assert calls.n["finetune"] == 0 and calls.n["run"] > 0  # FT is compare's, loaded
    assert (out / "interventions.json").exists()


def test_cli_refusals_are_one_line_before_the_comparison(files, tmp_path, capsys):
    model_dir, _ = files
    two = write_task(tmp_path / "two.jsonl", labels=("bad", "w1 good"))
    argv = cli(
        (model_dir, two), tmp_path / "a", "--interventions", "--label-words", "bad", "w1 good"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "every label word must be one token" in err
    assert not (tmp_path / "a" / "results.json").exists()
    assert main(cli(files, tmp_path / "b", "--interventions", "--fit-queries", "0")) == 2
    assert "--fit-queries must be >= 1, got 0" in capsys.readouterr().err
    assert main(cli(files, tmp_path / "c", "--interventions", "--other-task", "nope.jsonl")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_a_sweep_cell_passes_the_interventions_options():
    grid = Grid.from_dict(
        {
            "run": {"model": "m", "task": "sst2", "interventions": True, "fit_queries": 16},
            "grid": {"seed": [1, 2]},
        }
    )
    argv = grid.cells[0].argv("D", _options(run_parser()))
    assert "--interventions" in argv and "--fit-queries=16" in argv
    args = run_parser().parse_args(argv[1:])
    assert args.interventions and args.fit_queries == 16
