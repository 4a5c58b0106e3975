"""The comparison pipeline: metrics wired to hand-made recordings, end to end on a
random-init model and a local two-class file, the untrained-weights control, seeds,
checkpoints, and the errors a user can hit."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch

import icl_lens as il
from icl_lens.data.prompts import encode
from icl_lens.data.task_sources import TaskLoadError, load_task
from icl_lens.model.untrained import untrained_copy
from icl_lens.study.comparison import Comparison
from icl_lens.study.measure import CONTROL, FT_RETEST, ICL_RETEST, measure
from icl_lens.study.predict import label_tokens
from icl_lens.study.records import Records, record
from tests.models import make_model

TEMPLATE = "Sentence: {text} Label:"


def write_task(path, n_train=16, n_val=12, seed=0, labels=("bad", "good")):
    """A two-class JSONL file: class words w0..w44 are "bad", w45..w89 "good"."""
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", n_train), ("validation", n_val)):
        for i in range(n):
            label = i % 2
            words = [f"w{rng.randrange(45) + 45 * label}" for _ in range(rng.randrange(2, 5))]
            rows.append({"text": " ".join(words), "label": labels[label], "split": split})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = write_task(tmp_path_factory.mktemp("task") / "two_class.jsonl")
    # " \n" keeps the label word a token of its own for the word-level test tokenizer
    spec = il.TaskSpec("two_class", TEMPLATE, (" bad", " good"), separator=" \n")
    return load_task(path, spec=spec)


@pytest.fixture(scope="module")
def gpt2():
    return make_model("gpt2")[0]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the metrics, wired through the pipeline, on inputs known by hand -----------------


def _records(attn_out, predicted, gold, q=None, demo_scores=None):
    n = len(gold)
    scores = torch.nn.functional.one_hot(torch.tensor(predicted), 2).float()
    return Records(
        attn_out=torch.as_tensor(attn_out, dtype=torch.float32),
        q=torch.ones(n, 1, 1, 1) if q is None else q,
        query_scores=[torch.tensor([[[1.0, float(i), 2.0]]]) for i in range(n)],
        demo_scores=demo_scores,
        class_scores=scores,
        gold=torch.tensor(gold),
        positions=torch.full((n,), 2),
        prefix_length=6 if demo_scores is not None else 1,
    )


def test_metrics_on_hand_made_recordings():
    gold = [0, 1, 1, 0, 1, 0]
    # correctness:   ZSL  F F F T F T ;  FT  T T F T T F ;  ICL  T F T T T T
    zsl_pred = [1, 0, 0, 0, 0, 0]
    ft_pred = [0, 1, 0, 0, 1, 1]
    icl_pred = [0, 0, 1, 0, 1, 0]
    # ZSL wrong & FT right: queries 0, 1, 4; of those ICL right: 0, 4 -> 2/3
    h_zsl = torch.randn(6, 1, 8, generator=torch.Generator().manual_seed(0))
    update = torch.randn(6, 1, 8, generator=torch.Generator().manual_seed(1))
    # Kendall: 5 demonstration tokens, ties on both sides; FT scores = q_FT . q_train
    icl_demo = torch.tensor([[[3.0, 1.0, 1.0, 2.0, 5.0]]] * 6)
    ft_demo = torch.tensor([0.5, 0.5, 0.1, 0.9, 0.9])
    train_q = ft_demo.reshape(5, 1, 1, 1)

    def run(h_icl, h_ft):
        return measure(
            _records(h_zsl, zsl_pred, gold),
            _records(h_icl, icl_pred, gold, demo_scores=icl_demo),
            _records(h_ft, ft_pred, gold),
            train_q,
            n_resamples=50,
        ).results

    same = run(h_zsl + update, h_zsl + update)
    assert same["simaou"].normalised.value == pytest.approx(1.0)
    assert same["simaou"].unnormalised.value == pytest.approx(1.0)
    opposite = run(h_zsl + update, h_zsl - update)
    assert opposite["simaou"].unnormalised.value == pytest.approx(-1.0)

    r2 = same["rec2ftp"]
    assert (r2.n_ft_recovered, r2.n_both, r2.value) == (3, 2, pytest.approx(2 / 3))
    tau = scipy.stats.kendalltau(icl_demo[0, 0].numpy(), ft_demo.numpy(), variant="b").statistic
    assert same["kendall"].tau_b.value == pytest.approx(tau)
    assert same["kendall"].tau_b.values.shape == (6, 1)
    assert not math.isclose(tau, 0.0)


# ---- end to end -----------------------------------------------------------------------


def test_compare_end_to_end_on_a_random_init_model(gpt2, task, tmp_path):
    before = _state(gpt2)
    cmp = il.compare(
        gpt2,
        task,
        shots=4,
        seed=1,
        lr_grid=[1e300, 10.0],  # the first diverges: recorded, and the grid goes on
        lr_extend=0,
        n_resamples=100,
        progress=False,
    )
    after = _state(gpt2)
    assert all(torch.equal(before[k], after[k]) for k in before), "caller's model changed"

    assert set(cmp.accuracy) == {"zsl", "icl", "ft"}
    assert all(0.0 <= a <= 1.0 for a in cmp.accuracy.values())
    assert [t["diverged"] for t in cmp.lr_search] == [True, False] and cmp.lr == 10.0
    # 10 is the smallest rate tried: flagged, with the way to extend the grid
    assert any("lr 10 is the smallest" in f and "--lr-grid 1,3,10" in f for f in cmp.flags)
    assert {len(v) for v in cmp.predictions.values()} == {len(task.validation)}
    assert cmp.info["k_effective"] == 4

    frame = cmp.metrics()
    overall = frame[(frame["layer"] == -1) & (frame["head"] == -1)]
    assert set(overall["metric"]) == {"rec2ftp", "simaou", "simam", "kendall", "topk_recall"}
    assert set(frame["ft_mode"]) == {"standard"} and "flag" in frame
    # a metric with no eligible query (e.g. Rec2FTP of the random control, where no
    # query is wrong under ZSL and right under ICL: chance on a tiny model) is NaN and
    # says so with n_queries 0; every other value is finite, and the model's own rows
    # always have queries
    empty = overall["n_queries"] == 0
    assert np.isfinite(overall["value"][~empty]).all(), overall[~np.isfinite(overall["value"])]
    assert overall["value"][empty].isna().all()
    retest = {ICL_RETEST, FT_RETEST}
    # the authors' top-k (k = 100 tokens, 5 demonstrations) is undefined with fewer
    # tokens or demonstrations than that (both top-k sets would be everything)
    few_tokens = overall["metric"] == "topk_recall"
    assert cmp.info["demonstration_tokens"] <= 100 and empty[few_tokens].all()
    own = ~overall["baseline"].isin([CONTROL, *retest]) & ~few_tokens
    assert not empty[own].any(), overall[empty & own]
    expected = {
        ("rec2ftp", "paper"): {"independent", *retest},
        ("simaou", "normalised"): {
            "random_uniform",
            "random_gaussian",
            "shuffled_queries",
            *retest,
        },
        ("simaou", "unnormalised"): {"random_uniform", "shuffled_queries", *retest},
        ("simam", "changes"): {"random_uniform", "shuffled_heads", "shuffled_queries", *retest},
        ("simam", "before"): {"random_uniform", "shuffled_heads", "shuffled_queries"},
        ("kendall", "tau_b"): {"random_uniform", "shuffled_queries", *retest},
        ("topk_recall", "token"): {"random_uniform", "shuffled_queries", *retest},
        ("topk_recall", "example"): {"random_uniform", "shuffled_queries", *retest},
    }
    for (metric, variant), names in expected.items():
        rows = overall[(overall["metric"] == metric) & (overall["variant"] == variant)]
        assert names | {"none", CONTROL} <= set(rows["baseline"]), (metric, variant)
    # SimAM before (ICL vs ZSL) compares nothing with FT: no retest rows
    before = overall[(overall["metric"] == "simam") & (overall["variant"] == "before")]
    assert not set(before["baseline"]) & retest
    # the control: the mean over its draws, each draw kept in results.json
    assert cmp.control["n_draws"] == 3 and len(cmp.control["draws"]) == 3
    spread = cmp.control["spread"]["standard"]["simaou"]["normalised"]
    control_row = overall.query("metric == 'simaou' and variant == 'normalised'")
    control_row = control_row[control_row["baseline"] == CONTROL]
    assert control_row["value"].item() == pytest.approx(np.mean(spread["draws"]))
    # its interval covers the draws' spread, not only each draw's queries
    low, high = control_row["ci_low"].item(), control_row["ci_high"].item()
    draws = cmp.values["simaou", "normalised", CONTROL, "standard"]
    assert sorted(draws) == [(0,), (1,), (2,)]
    widths = [
        np.subtract(*il.analyses.bootstrap_ci(x, n_resamples=100)[::-1]) for x in draws.values()
    ]
    assert low < np.mean(spread["draws"]) < high and high - low > max(widths)
    # per-layer and per-head breakdowns
    simam = frame[(frame["metric"] == "simam") & (frame["baseline"] == "none")]
    assert {(la, h) for la, h in zip(simam["layer"], simam["head"], strict=True) if h >= 0} == {
        (la, h) for la in range(2) for h in range(4)
    }
    assert set(frame[frame["metric"] == "kendall"]["layer"]) == {-1, 0, 1}

    # results.json-style round trip, strict JSON
    path = cmp.to_json(tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert set(data["accuracy"]) == {"zsl", "icl", "ft"}
    for metric in ("rec2ftp", "simaou", "simam", "kendall", "topk_recall"):
        assert {"value", "baselines", "flag"} <= set(data["metrics"][metric])
        assert {CONTROL, *retest} <= set(data["metrics"][metric]["baselines"])
    assert data["flags"] == cmp.flags and data["ft_modes"]["standard"]["lr"] == cmp.lr
    back = Comparison.from_json(path)
    assert back.accuracy == cmp.accuracy and back.predictions == cmp.predictions
    assert back.lr == cmp.lr and back.lr_search == json.loads(json.dumps(cmp.lr_search))
    assert back.metrics().equals(cmp.metrics())
    same = json.dumps(back.summary(), sort_keys=True) == json.dumps(cmp.summary(), sort_keys=True)
    assert same  # as text: a NaN (a metric without eligible queries) equals itself there

    # the per-query values a bootstrap over runs needs, on disk without pickle
    values = Comparison.load_values(cmp.save_values(tmp_path / "values.npz"))
    assert values.keys() == cmp.values.keys()
    key = ("simaou", "normalised", "none", "standard")
    np.testing.assert_allclose(values[key][()], cmp.values[key][()], rtol=1e-6)
    key = ("simam", "after", CONTROL, "standard")  # (n, layer, head): heads averaged
    assert sorted(values[key]) == [(0,), (1,), (2,)]
    np.testing.assert_allclose(values[key][(1,)], cmp.values[key][(1,)].mean(axis=2), rtol=1e-6)


def test_rotary_gqa_model_and_the_dai2023_protocol(task):
    model, _ = make_model("llama")
    cmp = il.compare(
        model,
        task,
        shots=4,
        seed=1,
        lr_grid=[10.0],
        protocol="dai2023",
        control=False,
        n_resamples=50,
        progress=False,
    )
    overall = cmp.metrics().query("layer == -1 and head == -1 and baseline == 'none'")
    overall = overall[~overall["metric"].isin(["rec2ftp", "topk_recall"])]  # 4 shots: k >= n
    assert np.isfinite(overall["value"]).all()
    assert cmp.config["protocol"] == "dai2023"

    # dai2023 records at an appended first-candidate label token; the prediction is the
    # same as at the prediction position (causal attention)
    spec = task.spec
    labels = label_tokens(model.tokenizer, spec)
    tok = model.tokenizer
    queries = [torch.tensor(encode(tok, spec.format_query(ex))) for ex in task.validation[:3]]
    bos = torch.tensor([tok.bos_token_id])
    at_pred = record(model, bos, queries, labels)
    at_label = record(model, bos, queries, labels, protocol="dai2023")
    assert at_pred.positions.tolist() == [len(q) - 1 for q in queries]
    assert at_label.positions.tolist() == [len(q) for q in queries]
    torch.testing.assert_close(at_label.class_scores, at_pred.class_scores)
    # the query's tokens and the appended one, BOS left out as the authors'
    # attn_map[:, :, -1, c_len:] (c_len counts BOS); at the prediction position BOS is in
    assert [s.shape[-1] for s in at_label.query_scores] == [len(q) + 1 for q in queries]
    assert [s.shape[-1] for s in at_pred.query_scores] == [len(q) + 1 for q in queries]
    assert not torch.allclose(at_label.attn_out, at_pred.attn_out)


def test_dai2023_trains_and_ranks_as_the_authors(gpt2, task):
    """The authors' FT sequence is BOS + input + label (no separator), and their Kendall
    slice of the ICL scores skips one separator token after each demonstration
    (LMOps compute_training_example_attn.py slice_icl_attn_map): the kept ICL columns and
    the FT training tokens are the same tokens, in the same order."""
    from icl_lens.study.finetune import training_sequences
    from icl_lens.study.orders import kept_columns

    prompt = il.task_prompt(gpt2.tokenizer, task.spec, task.train[:3], task.validation[0])
    assert prompt.separator_lengths == (1, 1, 1)
    columns = kept_columns(prompt, separators=False)
    demo_tokens = prompt.tokens[1 : prompt.query_start]
    trained = torch.cat([s[1:] for s in training_sequences(prompt, separators=False)])
    assert torch.equal(demo_tokens[columns], trained)
    sep = encode(gpt2.tokenizer, task.spec.separator)
    assert len(demo_tokens) - len(columns) == 3 and sep[0] not in trained.tolist()
    # with separators (the "prediction" protocol) every demonstration token is trained on
    assert kept_columns(prompt) is None
    with_sep = torch.cat([s[1:] for s in training_sequences(prompt)])
    assert torch.equal(with_sep, demo_tokens)


def test_dai2023_simam_leaves_bos_out(gpt2, task):
    """SimAM under dai2023 reads attn_map[:, :, -1, c_len:] with c_len counting BOS: the
    recorded row is the score row of the appended token without its BOS column."""
    from icl_lens.hooks import Capture

    spec, tok = task.spec, gpt2.tokenizer
    labels = label_tokens(tok, spec)
    q = torch.tensor(encode(tok, spec.format_query(task.validation[0])))
    bos = torch.tensor([tok.bos_token_id])
    rec = record(gpt2, bos, [q], labels, protocol="dai2023")
    full = torch.cat([bos, q, torch.tensor(labels.first[:1])])
    adapter = il.adapt(gpt2)
    cap = Capture(adapter, what={"scores"})
    with adapter.inference():
        cap.run(full[None], positions=torch.tensor([[len(full) - 1]]))
    row = torch.stack([cap.values["scores", la][0, 0] for la in range(adapter.n_layers)])
    torch.testing.assert_close(rec.query_scores[0], row[..., 1:].float())


def test_checkpoints_resume_and_refuse_other_settings(gpt2, task, tmp_path):
    kw = dict(shots=4, seed=2, lr_grid=[10.0], control=False, n_resamples=50, progress=False)
    first = il.compare(gpt2, task, checkpoint_dir=tmp_path, **kw)
    assert first.stages["loaded"] == [] and "lr=10.0" in first.stages["computed"]
    again = il.compare(gpt2, task, checkpoint_dir=tmp_path, **kw)
    assert again.stages["computed"] == []
    assert again.metrics().equals(first.metrics()) and again.accuracy == first.accuracy
    with pytest.raises(ValueError, match="other settings.*shots"):
        il.compare(gpt2, task, checkpoint_dir=tmp_path, **{**kw, "shots": 2})


def test_aggregation_over_seeds_and_orders(gpt2, task):
    runs = il.compare_runs(
        gpt2,
        task,
        seeds=(1, 2),
        orders=(None, 0),
        shots=4,
        lr_grid=[10.0],
        control=False,
        n_resamples=20,
        progress=False,
    )
    assert len(runs.runs) == 4
    summary = runs.summary()
    row = summary.query("metric == 'simaou' and variant == 'normalised' and baseline == 'none'")
    row = row.query("layer == -1 and head == -1")
    assert row["n"].item() == 4 and np.isfinite(row["std"].item())
    assert list(runs.accuracy().columns) == ["seed", "order", "zsl", "icl", "ft"]

    # the headline: nested mean over sets and orders, hierarchical interval
    table = runs.table(n_resamples=200)
    head = table.query("metric == 'simaou' and variant == 'normalised' and baseline == 'none'")
    per_run = {k: c.summary()["simaou"]["value"] for k, c in runs.runs.items()}
    by_set = [np.mean([v for (s, _), v in per_run.items() if s == seed]) for seed in (1, 2)]
    assert head["value"].item() == pytest.approx(np.mean(by_set))
    assert head["ci_low"].item() < head["value"].item() < head["ci_high"].item()
    assert {"icl_retest", "ft_retest"} <= set(table["baseline"]) and "flag" in table


def test_compare_runs_records_zero_shot_once(gpt2, task, monkeypatch):
    """ZSL does not depend on the demonstrations: compare_runs computes it once for all
    seeds (and each control draw's once), and every run still holds it."""
    import icl_lens.study.pipeline as module

    real, calls = module.record, []

    def spy(*a, desc="", **kw):
        calls.append(desc)
        return real(*a, desc=desc, **kw)

    monkeypatch.setattr(module, "record", spy)
    runs = il.compare_runs(
        gpt2, task, seeds=(1, 2), shots=4, lr_grid=[10.0], n_draws=2, n_resamples=20,
        progress=False,
    )  # fmt: skip
    assert calls.count("zsl") == 1 and calls.count("control-0-zsl") == 1
    assert calls.count("icl") == 2 and calls.count("control-1-icl") == 2
    a, b = (c.accuracy["zsl"] for c in runs.runs.values())
    assert a == b


# ---- test-retest ceilings, FT modes, lr selection --------------------------------------


def test_retests_put_tokens_back_in_the_first_order(gpt2, task):
    """ICL in another order and FT trained in another order are compared token by token:
    the index that maps the other order's token axis back gives the first order's tokens,
    for the demonstration tokens (ICL) and the training tokens (FT, without separators
    under dai2023)."""
    from icl_lens.study.finetune import training_sequences
    from icl_lens.study.orders import block_index, block_lengths, kept_columns, other_order

    tok, spec = gpt2.tokenizer, task.spec
    demos = task.train[:5]
    order = other_order(len(demos), seed=0)
    assert order != list(range(5))
    first = il.task_prompt(tok, spec, demos, task.validation[0])
    other = il.task_prompt(tok, spec, [demos[i] for i in order], task.validation[0])
    tokens, tokens2 = first.tokens[1 : first.query_start], other.tokens[1 : other.query_start]
    assert torch.equal(tokens2[block_index(block_lengths(first), order)], tokens)
    for sep in (True, False):
        train = torch.cat([s[1:] for s in training_sequences(first, separators=sep)])
        train2 = torch.cat([s[1:] for s in training_sequences(other, separators=sep)])
        back = block_index(block_lengths(first, separators=sep), order)
        assert torch.equal(train2[back], train)
        columns = kept_columns(first, separators=sep)
        assert torch.equal(tokens if columns is None else tokens[columns], train)


def test_both_ft_modes_side_by_side(gpt2, task):
    cmp = il.compare(
        gpt2, task, shots=4, seed=1, lr_grid=[3.0, 10.0], ft_mode="both", n_draws=1,
        n_resamples=50, progress=False,
    )  # fmt: skip
    assert set(cmp.ft_modes) == {"standard", "layer_causal"}
    assert {"ft", "ft_layer_causal"} <= set(cmp.accuracy) and cmp.lr == cmp.ft_modes["standard"][
        "lr"
    ]
    frame = cmp.metrics()
    assert set(frame["ft_mode"]) == {"standard", "layer_causal"}
    rows = frame.query("layer == -1 and head == -1 and baseline == 'none'")
    by_mode = {m: r.set_index(["metric", "variant"])["value"] for m, r in rows.groupby("ft_mode")}
    # what does not involve FT is the same in both modes; what does, differs
    assert by_mode["standard"]["simam", "before"] == by_mode["layer_causal"]["simam", "before"]
    assert (
        by_mode["standard"]["simaou", "normalised"]
        != by_mode["layer_causal"]["simaou", "normalised"]
    )
    assert set(cmp.control["spread"]) == {"standard", "layer_causal"}
    assert cmp.table("layer_causal").index.equals(cmp.table().index)
    with pytest.raises(ValueError, match="ft_mode must be one of"):
        il.compare(gpt2, task, shots=4, ft_mode="causal", progress=False)


def test_lr_selection_on_a_held_out_split(gpt2, task):
    """``lr_selection="holdout"``: the grid is judged on training examples that are
    neither demonstrations nor measured queries; the authors' choice on the measured
    queries stays the default."""
    from icl_lens.study.finetune import finetune
    from icl_lens.study.plan import _holdout
    from icl_lens.study.predict import predict_queries

    kw = dict(shots=4, seed=1, lr_grid=[3.0, 10.0], lr_extend=0, control=False, retest=False)
    kw |= dict(n_resamples=20, progress=False)
    cmp = il.compare(gpt2, task, lr_selection="holdout", **kw)
    assert cmp.config["lr_selection"] == "holdout" and cmp.config["lr_holdout"] == 12
    demos = il.sample_demonstrations(task, 4, seed=1)
    held = _holdout(task, demos, 12, seed=1)
    assert not {id(e) for e in held} & {id(e) for e in demos + task.validation}
    tok, spec = gpt2.tokenizer, task.spec
    prompt = il.task_prompt(tok, spec, demos, task.validation[0])
    labels = label_tokens(tok, spec, context=spec.format_query(task.validation[0]))
    held_queries = [torch.tensor(encode(tok, spec.format_query(e))) for e in held]
    for trial in cmp.lr_search:
        ft = finetune(gpt2, prompt, lr=trial["lr"], record_queries=False)
        pred = predict_queries(
            ft.model, prompt.tokens[:1], held_queries, labels, gold=[e.label for e in held]
        )
        assert trial["accuracy"] == pred.accuracy
    assert il.compare(gpt2, task, **kw).config["lr_selection"] == "queries"  # the default
    with pytest.raises(ValueError, match="beyond the 16 demonstrations"):
        il.compare(gpt2, task, lr_selection="holdout", **{**kw, "shots": 16})
    with pytest.raises(ValueError, match="lr_selection must be one of queries, holdout"):
        il.compare(gpt2, task, lr_selection="train", **kw)


# ---- the untrained-weights control ----------------------------------------------------


def test_untrained_copy_is_seeded_moment_matched_and_leaves_the_model(gpt2):
    before = _state(gpt2)
    a, b = untrained_copy(gpt2, seed=0), untrained_copy(gpt2, seed=0)
    c = untrained_copy(gpt2, seed=1)
    assert all(torch.equal(before[k], v) for k, v in _state(gpt2).items())
    for (name, p), (_, q), (_, r), (_, s) in zip(
        gpt2.named_parameters(),
        a.named_parameters(),
        b.named_parameters(),
        c.named_parameters(),
        strict=True,
    ):
        assert torch.equal(q, r), name  # same seed, same weights
        if p.numel() > 1 and p.std() > 0:
            assert not torch.equal(p, q) and not torch.equal(q, s), name
            assert float(q.detach().std()) == pytest.approx(float(p.detach().std()), rel=0.35), name
        else:
            assert torch.allclose(q, p), name  # constant tensors stay constant


# ---- errors ---------------------------------------------------------------------------


def test_label_words_sharing_a_first_token_are_refused(gpt2, tmp_path):
    bad = load_task(
        write_task(tmp_path / "t.jsonl", labels=(0, 1)),
        template=TEMPLATE,
        label_words=[" good", " good bad"],
    )
    with pytest.raises(ValueError, match="share their first token"):
        il.compare(gpt2, bad, shots=2, lr_grid=[0.1], progress=False)


def test_more_shots_than_train_examples(gpt2, task):
    with pytest.raises(ValueError, match=r"k=40 .* only 16 examples"):
        il.compare(gpt2, task, shots=40, lr_grid=[0.1], progress=False)


def test_a_hub_task_offline_says_how_to_pass_a_local_file(gpt2):
    # cb: the one paper task without an offline copy to fall back to (StaICC)
    with pytest.raises(TaskLoadError, match="Pass a local file instead"):
        il.compare(gpt2, "cb", shots=2, lr_grid=[0.1], progress=False)


def test_gemma3_tokens_outside_the_sliding_window_are_left_out_of_the_metrics(task):
    """Gemma 3's local layers (window 8 here) cannot see the early demonstrations or BOS
    of an ICL prompt: those scores are -inf in the recordings (not NaN, not a huge
    finite number), and every metric is computed over the tokens each layer sees."""
    model, hf = make_model("gemma3")
    cmp = il.compare(
        model,
        task,
        shots=4,
        seed=1,
        lr_grid=[10.0],
        control=False,
        n_resamples=50,
        progress=False,
    )
    overall = cmp.metrics().query("layer == -1 and head == -1")
    # top-k recall (k = 100 tokens, 5 demonstrations) is undefined with 4 shots; Rec2FTP
    # may be on 12 queries; the test-retest ceilings compare masked scores on both sides
    defined = overall[~overall["metric"].isin(["rec2ftp", "topk_recall"])]
    assert {"icl_retest", "ft_retest"} <= set(defined["baseline"])
    assert np.isfinite(defined["value"]).all()

    spec, tok = task.spec, model.tokenizer
    labels = label_tokens(tok, spec)
    prompt = il.task_prompt(tok, spec, task.train[:4], task.validation[0])
    queries = [torch.tensor(encode(tok, spec.format_query(ex))) for ex in task.validation[:3]]
    rec = record(model, prompt.prefix, queries, labels)
    window, n_prefix = hf.config.sliding_window, len(prompt.prefix)
    demo_positions = torch.arange(1, n_prefix)
    for n, position in enumerate(rec.positions.tolist()):
        too_far = n_prefix + position - demo_positions >= window
        assert too_far.any() and (~too_far).any()
        for layer, kind in enumerate(hf.config.layer_types):
            demo, query_side = rec.demo_scores[n, layer], rec.query_scores[n][layer]
            if kind == "sliding_attention":
                assert torch.equal(torch.isneginf(demo), too_far)
                assert torch.isneginf(query_side[:, 0]).all()  # BOS
                assert torch.isfinite(query_side[:, 1:]).all()
            else:
                assert torch.isfinite(demo).all() and torch.isfinite(query_side).all()
