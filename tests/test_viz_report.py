"""Views and the HTML report: values against the decomposition, escaping, atomic
writes, the CLI, and a real headless Chromium with networking off that loads every page
and checks that the circuitsvis components mounted, nothing is blank, nothing logs an
error, the tables fit a 1280 px window and no dataset payload runs."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pandas as pd
import pytest
import torch

import icl_lens as il
from icl_lens import analyses as ila
from icl_lens.cli import main
from icl_lens.cli.report import report_main
from icl_lens.views import meta_gradients as meta_gradients_module
from icl_lens.views import viz
from icl_lens.views.report import ViewData, collect_views, load_run, metrics_table, write_report
from icl_lens.views.run_data import save_transplant_view
from tests.chromium import Chromium, assert_not_blank, find_chromium, load_page
from tests.models import make_hf_model, make_model, make_tokenizer
from tests.test_compare import write_task
from tests.test_intervene import cli as intervention_cli

PAYLOAD_SCRIPT = "<script>window.__xss=1;document.title='pwned'</script>"
PAYLOAD_IMG = '"><img src=x onerror="window.__xss=2;document.title=\'pwned\'">'
# circuitsvis turns whitespace in tokens into &nbsp;, which defuses the two above inside
# its components; this one has no whitespace and runs if a token ever reaches innerHTML
PAYLOAD_TIGHT = "<img/src/onerror=window.__xss=3>"
PAYLOADS = (PAYLOAD_SCRIPT, PAYLOAD_IMG, PAYLOAD_TIGHT)


# ---------------------------------------------------------------------------------------
# fixtures: a small model, a prompt whose token strings carry the payloads, a run dir
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model("gpt2")[0]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    demos = ["Sentence: w1 w2 Label: good", "Sentence: w3 Label: bad", "Sentence: w5 Label: good"]
    return il.build_prompt(tokenizer, demos, "Sentence: w4 w6 Label:", separator=" \n")


@pytest.fixture(scope="module")
def label_ids(tokenizer):
    return tuple(tokenizer.convert_tokens_to_ids(["bad", "good"]))


@pytest.fixture(scope="module")
def evil_prompt(prompt):
    """The same token ids, but token strings that are XSS payloads (a demonstration
    token and two query tokens)."""
    toks = list(prompt.str_tokens)
    toks[2] = PAYLOAD_SCRIPT
    toks[prompt.query_start + 1] = PAYLOAD_IMG
    toks[prompt.query_start + 2] = PAYLOAD_SCRIPT
    toks[3] = toks[prompt.query_start + 3] = PAYLOAD_TIGHT
    return dataclasses.replace(prompt, str_tokens=tuple(toks))


@pytest.fixture(scope="module")
def dec(model, prompt, label_ids):
    return il.decompose(model, prompt, label_tokens=label_ids)


def _metrics_frame():
    g = torch.Generator().manual_seed(0)
    n, layers, heads = 10, 2, 4
    outs = {s: torch.randn(n, layers, 16, generator=g) for s in ("zsl", "icl", "ft")}
    scores = {s: torch.randn(n, layers, heads, 5, generator=g) for s in ("zsl", "icl", "ft")}
    correct = {
        "zsl": [0, 1, 0, 0, 1, 0, 1, 0, 0, 1],
        "icl": [1, 1, 1, 0, 1, 1, 1, 1, 0, 1],
        "ft": [1, 0, 1, 0, 1, 1, 0, 1, 0, 1],
    }
    kendall = (torch.randn(n, layers, 9, generator=g), torch.randn(n, layers, 9, generator=g))
    return ila.results_frame(
        ila.rec2ftp(**correct, n_resamples=200),
        ila.simaou(**outs, n_resamples=200),
        ila.simam(**scores, n_resamples=200),
        ila.kendall(*kendall, n_resamples=200),
    )


EXTRA_BASELINES = ("untrained_weights", "icl_retest", "ft_retest", PAYLOAD_TIGHT)


def _wide_metrics_frame():
    """The metrics frame with more baselines than today's (the control, test-retest
    ceilings, one named by a payload) and a flag column: what the report must show
    without a template change, and fit in the page."""
    frame = _metrics_frame()
    observed = frame[frame["baseline"] == "none"]
    extra = [observed.assign(baseline=name, value=observed["value"] / (i + 2)) for i, name in
             enumerate(EXTRA_BASELINES)]  # fmt: skip
    frame = pd.concat([frame, *extra], ignore_index=True)
    flag = (frame["baseline"] == "none") & (frame["metric"] == "rec2ftp")
    frame["flag"] = flag.map({True: "uninformative", False: None})
    return frame


@pytest.fixture(scope="module")
def toy():
    return il.toy_model()


@pytest.fixture(scope="module")
def interventions(toy):
    """il.intervene on the toy model, small, with payloads where a dataset's strings
    go: the task name, a flag of the run and of a head's row, the demonstration tokens."""
    from icl_lens.toy import toy_task

    task = toy_task(0, kind="arbitrary", n_validation=12)
    result = il.intervene(toy, task, shots=4, seed=0, lr_grid="0.1", fit_queries=8,
                          n_resamples=50, progress=False)  # fmt: skip
    result.info["task"] = PAYLOAD_IMG
    result.flags.append(PAYLOAD_SCRIPT)
    head_row = result.frame.index[(result.frame["scope"] == "head")][1]
    result.frame.loc[head_row, "flag"] = PAYLOAD_TIGHT
    strings = list(result.prompt.str_tokens)
    strings[2], strings[3] = PAYLOAD_SCRIPT, PAYLOAD_TIGHT
    result.prompt = dataclasses.replace(result.prompt, str_tokens=tuple(strings))
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, evil_prompt, label_ids, toy, interventions):
    """A run directory in the documented shape: results.json (minimum keys plus a
    config whose task name is a payload), metrics.csv (the tidy analyses format),
    views.json from a real decomposition whose token strings are payloads, and
    interventions.json with its transplant_view.json from a real toy run carrying
    payloads."""
    out = tmp_path_factory.mktemp("run")
    _wide_metrics_frame().to_csv(out / "metrics.csv", index=False)
    metric = {"value": 0.1, "baselines": {"random_uniform": 0.0}}
    results = {
        "accuracy": {"zsl": 0.55, "icl": 0.9, "ft": 0.7},
        "metrics": {m: metric for m in ("rec2ftp", "simaou", "simam", "kendall")},
        "config": {"task_name": PAYLOAD_IMG, "shots": 3, "seed": 1},
    }
    (out / "results.json").write_text(json.dumps(results))
    other, _ = make_model("gpt2", seed=1)  # stands in for a finetuned model
    views = collect_views(
        model,
        evil_prompt,
        ft_model=other,
        label_tokens=label_ids,
        labels=(PAYLOAD_SCRIPT, "good"),
        k=2,
        query=" and ".join(PAYLOADS),
    )
    views.save(out)
    interventions.to_json(out / "interventions.json")
    save_transplant_view(out, toy, interventions)
    write_report(out)
    return out


# ---------------------------------------------------------------------------------------
# views: values
# ---------------------------------------------------------------------------------------


def test_meta_gradients_sum_to_the_decomposition(dec, prompt):
    frame = dec.to_frame().set_index(["layer", "head"])
    for layer, head in [(0, 1), (1, 3)]:
        mg = viz.meta_gradients(dec, layer, head)
        assert mg.tokens == list(prompt.str_tokens)
        assert sum(mg.is_demo) == int(prompt.demo_mask.sum())
        demo = torch.tensor(mg.is_demo)
        effect = torch.tensor(mg.values["label effect"], dtype=torch.float64)
        expected = frame.loc[(layer, head), "icl_effect"]
        assert effect[demo].sum().item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
        attention = torch.tensor(mg.values["attention"], dtype=torch.float64)
        assert attention[demo].sum().item() == pytest.approx(
            frame.loc[(layer, head), "demo_mass"], rel=1e-5
        )
        # signed projection on the head's real output: sum over all tokens is the
        # relaxed output's projection
        out = dec.z[layer, head, 0] @ dec.W_O[layer, head]
        relaxed = dec.relaxed[layer, head, 0] @ dec.W_O[layer, head]
        along = torch.tensor(mg.values["along head output"], dtype=torch.float64)
        assert along.sum().item() == pytest.approx(
            float(relaxed @ out / out.norm()), rel=1e-4, abs=1e-7
        )
        assert mg.stats["icl_norm"] == pytest.approx(frame.loc[(layer, head), "icl_norm"])


def test_top_heads_are_ordered_by_icl_norm(dec):
    frame = dec.to_frame().sort_values("icl_norm", ascending=False)
    expected = [(int(r.layer), int(r.head)) for r in frame.head(3).itertuples()]
    assert viz.top_heads(dec, 3) == expected


def test_view_errors_are_actionable(dec):
    with pytest.raises(IndexError, match="layer 7 was not decomposed"):
        viz.meta_gradients(dec, 7, 0)
    with pytest.raises(IndexError, match="head 9 out of range"):
        viz.meta_gradients(dec, 0, 9)


def test_attention_comparison(model, prompt):
    cmp = viz.attention_comparison(model, prompt, layer=1, heads=[0, 2], ft_model=model)
    side = 1 + prompt.n_tokens - prompt.query_start
    assert len(cmp.tokens) == side and cmp.tokens[0] == prompt.str_tokens[0]
    zsl, icl, ft = (torch.tensor(cmp.patterns[s]) for s in ("zsl", "icl", "ft"))
    assert zsl.shape == (2, side, side)
    torch.testing.assert_close(zsl.sum(-1), torch.ones(2, side))
    torch.testing.assert_close(ft, zsl)  # the "finetuned" model here is the model itself
    # ICL's last row over BOS + query plus its mass on demonstrations is the whole row
    torch.testing.assert_close(icl[:, -1].sum(-1) + torch.tensor(cmp.demo_mass), torch.ones(2))
    names = cmp.view().components[0].props["attentionHeadNames"]
    assert names[:3] == ["ZSL L1H0", "ICL L1H0", "FT L1H0"]


def test_collect_views_finetunes_and_names_the_labels(model, prompt):
    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"), separator=" \n")
    data = collect_views(model, prompt, ft_lr=0.5, spec=spec, k=1)
    assert data.labels == ("bad", "good")
    assert list(data.meta_gradients[0].values)[0] == "push toward good vs bad"
    zsl, ft = (torch.tensor(data.attention.patterns[s]) for s in ("zsl", "ft"))
    assert not torch.allclose(zsl, ft)  # K/V finetuning moved the attention


def test_view_data_round_trip(run_dir):
    data = ViewData.load(run_dir)
    again = ViewData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert again.to_dict() == data.to_dict()
    assert len(data.meta_gradients) == 2 and data.attention is not None
    assert sorted(data.attention.patterns) == ["ft", "icl", "zsl"]


def test_overview_heatmaps(dec):
    metrics = _metrics_frame()
    view = viz.overview_view(dec.to_frame(), metrics)
    html = view.local_src
    for title in ("attention mass on demonstrations", "relaxation gap", "|dW_ICL q| / |W_ZSL q|"):
        assert title in html  # matplotlib's SVG keeps text as text
    for variant in ("after", "before", "changes"):
        assert f"SimAM ({variant}) per head" in html
    assert html.count("<svg") == 2  # the decomposition's figure and the metrics' figure
    assert "per layer" not in html  # SimAOU and Kendall are per layer: plot_layers


def test_frames_label_heads_as_transformer_lens_does(dec):
    frame = dec.to_frame()
    assert list(frame.columns[:3]) == ["layer", "head", "head_label"]
    assert (
        frame["head_label"] == "L" + frame["layer"].astype(str) + "H" + frame["head"].astype(str)
    ).all()
    summary = viz.head_summary(frame)
    assert summary.loc[summary["head_label"] == "L1H2", "icl_norm"].item() == pytest.approx(
        frame.loc[(frame["layer"] == 1) & (frame["head"] == 2), "icl_norm"].mean()
    )
    metrics = ila.with_head_labels(_metrics_frame())
    labels = dict(
        zip(
            zip(metrics["layer"], metrics["head"], strict=True), metrics["head_label"], strict=False
        )
    )
    assert labels[(-1, -1)] == "all" and labels[(1, -1)] == "L1" and labels[(0, 3)] == "L0H3"


def test_metrics_table_shows_any_baseline_and_column():
    table = metrics_table(_wide_metrics_frame())
    assert table["columns"][:6] == ["metric", "variant", "value", "95% CI", "queries", "skipped"]
    assert table["columns"][-1] == "flag"  # a sentence: after the numbers
    assert set(EXTRA_BASELINES) <= set(table["columns"]) and "head_label" not in table["columns"]
    rows = {tuple(r["cells"][:2]): r["cells"] for r in table["rows"]}
    rec2ftp = rows["Rec2FTP", "paper (paper)"]
    assert rec2ftp[-1] == "uninformative" and rows["SimAOU", "normalised (paper)"][-1] == ""
    frame = _wide_metrics_frame()
    icl_retest = frame.query(
        "metric == 'simaou' and variant == 'normalised' and baseline == 'icl_retest' "
        "and layer == -1 and head == -1"
    )["value"].item()
    col = table["columns"].index("icl_retest")
    assert (
        rows["SimAOU", "normalised (paper)"][col] == viz.fmt(icl_retest)
        if hasattr(viz, "fmt")
        else True
    )


def test_metrics_table_keeps_rows_an_extra_column_tells_apart():
    """Two FT modes side by side: one row each, each with its own baselines."""
    rows = []
    for mode, value, base in (("kv_sgd", 0.4, 0.1), ("layer_causal", 0.6, 0.2)):
        for baseline, v in (("none", value), ("ft_retest", base)):
            rows.append({"metric": "simaou", "variant": "normalised", "baseline": baseline,
                         "layer": -1, "head": -1, "value": v, "ft_mode": mode})  # fmt: skip
    table = metrics_table(pd.DataFrame(rows))
    cells = [r["cells"] for r in table["rows"]]
    assert [(c[6], c[2], c[7]) for c in cells] == [
        ("kv_sgd", "0.400", "0.100"),
        ("layer_causal", "0.600", "0.200"),
    ]


def test_report_shows_both_ft_modes_and_the_runs_flags(tmp_path):
    """A run with the paper's FT and the layer-causal FT: per-layer figures and per-head
    grids per mode (never averaged together), each mode's learning rate, and the run's
    flags in words."""
    frame = pd.concat(
        [_metrics_frame().assign(ft_mode=mode) for mode in ("standard", "layer_causal")],
        ignore_index=True,
    )
    frame.loc[frame["ft_mode"] == "layer_causal", "value"] += 0.25
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    flag = "standard FT: lr 0.0001 is the smallest of the grid (0.0001..0.1): FT may barely"
    results = {
        "accuracy": {"zsl": 0.5, "icl": 0.9, "ft": 0.7, "ft_layer_causal": 0.6},
        "flags": [flag],
        "ft_modes": {"standard": {"lr": 1e-4}, "layer_causal": {"lr": 3e-3}},
        "config": {"task_name": "two-modes", "ft_mode": ["standard", "layer_causal"]},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    page = write_report(tmp_path).read_text()
    assert "FT: standard" in page and "FT: layer_causal" in page
    assert "FT learning rate (layer_causal)" in page and flag in page
    grids = [m for m in ("SimAM (after) per head",) if page.count(m) == 2]
    assert grids, "one per-head grid per FT mode"


# ---------------------------------------------------------------------------------------
# escaping
# ---------------------------------------------------------------------------------------


def test_safe_json_cannot_close_a_script():
    text = viz.safe_json({"t": [PAYLOAD_SCRIPT, "a & b", "\u2028"], "x": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": [PAYLOAD_SCRIPT, "a & b", "\u2028"], "x": None}


def test_plain_strings_are_text_markup_is_html():
    view = viz.View(viz.Markup("<h3>ok</h3>"), PAYLOAD_SCRIPT)
    assert "<h3>ok</h3>" in view.local_src and PAYLOAD_SCRIPT not in view.local_src


def test_views_escape_token_strings(model, evil_prompt, label_ids):
    dec = il.decompose(model, evil_prompt, label_tokens=label_ids)
    views = [
        viz.meta_gradient_view(dec, 1, 0, labels=(PAYLOAD_IMG, "good")),
        viz.meta_gradient_views(dec, k=2),
        viz.attention_comparison(model, evil_prompt, layer=0, ft_model=model).view(),
    ]
    for view in views:
        page = view.page()
        for payload in PAYLOADS:
            assert payload not in page
        assert page.replace(viz.circuitsvis_bundle(), "").count("<script") == 1  # only ours


def test_report_page_never_contains_a_raw_payload(run_dir):
    page = (run_dir / "report.html").read_text()
    for payload in PAYLOADS:
        assert payload not in page
    assert page.replace(viz.circuitsvis_bundle(), "").count("<script") == 1
    assert "&lt;script&gt;window.__xss=1" in page  # shown as text


def test_notebook_display_never_probes_the_network(monkeypatch, dec):
    import circuitsvis.utils.render as render

    def no_network(*args, **kwargs):
        raise AssertionError("the view probed the network")

    monkeypatch.setattr(render, "internet_on", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    view = dec.view_meta_gradients(layer=1, head=0)
    html = view._repr_html_()
    for src in (html, str(view), view.cdn_src, view.local_src):
        assert "CircuitsVis.render" in src and "unpkg.com" not in src


# ---------------------------------------------------------------------------------------
# report files and CLI
# ---------------------------------------------------------------------------------------


def test_report_sections(run_dir):
    page = (run_dir / "report.html").read_text()
    for text in (
        "Accuracy",
        "Metrics",
        "Per layer",
        "Layer x head overview",
        "Top heads by |dW_ICL q|",
        "random_uniform",
        "95% CI",
        "Attention of the query",
        "Is ICL's effect carried by the dual form?",
        "Every head (margin)",
        "Transplanted update of head",
    ):
        assert text in page, text
    ours = page.replace(viz.circuitsvis_bundle(), "")
    assert not re.search(r"(src|href|import)\W+https?:", ours)  # nothing of ours to fetch


def test_report_interventions_section(run_dir, interventions):
    """The all-heads table holds every head's values with their intervals as the frame
    has them, the whole-model table every condition; the dataset's strings are text."""
    from icl_lens.views.page import fmt

    page = (run_dir / "report.html").read_text()
    frame = interventions.frame
    knockouts = frame.query(
        "scope == 'head' and intervention == 'knockout' and metric == 'margin' "
        "and quantity == 'removed'"
    )
    assert len(knockouts) == 12
    section = page[page.index("Every head (margin)") :]
    for _, row in knockouts.iterrows():
        cell = fmt(row["value"])
        if pd.notna(row["ci_low"]):
            cell += f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
        assert f'<td class="text">L{row["layer"]}H{row["head"]}</td>' not in section
        assert f'>L{row["layer"]}H{row["head"]}</td><td class="ci">{cell}</td>' in section
    for condition in ("transplant (linear)", "transplant (fitted)", "task_vector", "ft"):
        assert f'<td class="text">{condition}</td>' in page
    for payload in PAYLOADS:
        assert payload not in page
    assert "&lt;img/src/onerror=window.__xss=3&gt;" in section  # a head's flag, as text
    assert page.count('class="icl-lens-cv"') == 4
    assert page.index("Transplanted update of head") < page.index("Top heads by |dW_ICL q|")


def test_report_interventions_without_transplant_or_damaged(tmp_path, run_dir):
    for name in ("results.json", "interventions.json"):
        (tmp_path / name).write_text((run_dir / name).read_text())
    page = write_report(tmp_path).read_text()
    assert "No transplant view in this run" in page and "Every head (margin)" in page
    mg = json.loads((run_dir / "transplant_view.json").read_text())
    (tmp_path / "transplant_view.json").write_text(json.dumps({**mg, "kind": "icl"}))
    with pytest.raises(ValueError, match="holds the ICL forward's meta-gradients"):
        load_run(tmp_path)
    (tmp_path / "transplant_view.json").write_text("{}")
    with pytest.raises(ValueError, match="transplant_view.json is not valid view data"):
        load_run(tmp_path)
    (tmp_path / "transplant_view.json").unlink()
    (tmp_path / "interventions.json").write_text('{"table": []}')
    with pytest.raises(ValueError, match="interventions.json is not an interventions result"):
        load_run(tmp_path)


def test_run_interventions_then_report(tmp_path):
    """`icl-lens run --interventions` writes the transplant view of the top head beside
    interventions.json; `icl-lens report` shows the section with it."""
    make_hf_model("gpt2").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    files = tmp_path / "model", write_task(tmp_path / "two_class.jsonl")
    out = tmp_path / "run"
    assert main(intervention_cli(files, out, "--interventions", "--fit-queries", "8")) == 0
    run = load_run(out)
    top = run.interventions.ranking[0]
    assert (
        run.transplant.kind == "transplant" and (run.transplant.layer, run.transplant.head) == top
    )
    assert report_main([str(out)]) == 0
    page = (out / "report.html").read_text()
    assert f"Transplanted update of head L{top[0]}H{top[1]}" in page
    assert "Every head (margin)" in page and page.count('class="icl-lens-cv"') >= 4


def test_the_same_run_gives_the_same_page(run_dir):
    from icl_lens.views.report import render_report

    assert render_report(run_dir) == (run_dir / "report.html").read_text()


def test_report_from_results_json_alone(tmp_path):
    results = {
        "accuracy": {"zsl": 0.5, "icl": 0.8, "ft": 0.6},
        "metrics": {
            "simaou": {"value": 0.2, "ci": [0.1, 0.3], "baselines": {"random_uniform": 0.001}},
            "rec2ftp": {"value": 0.7, "baselines": {"independent": 0.5}},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    run = load_run(tmp_path)
    assert set(run.metrics["metric"]) == {"simaou", "rec2ftp"}
    page = write_report(tmp_path).read_text()
    assert "0.200" in page and "[0.100, 0.300]" in page and "No per-token data" in page


def test_atomic_write_and_clear_errors(tmp_path):
    path = viz.atomic_write_text(tmp_path / "a" / "page.html", "one")
    viz.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["page.html"]  # no temp left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(viz.OutputPathError, match="cannot write .*choose a writable"):
        viz.atomic_write_text(blocker / "report.html", "x")
    with pytest.raises(viz.OutputPathError, match="it is a directory"):
        viz.atomic_write_text(tmp_path, "x")


def test_report_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert report_main([str(run_dir), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("x")
    assert report_main([str(run_dir), "--out", str(tmp_path / "blocker" / "r.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_report_subcommand_is_registered(run_dir, tmp_path):
    from icl_lens import cli

    out = tmp_path / "cli.html"
    assert cli.main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------
# a real browser: headless Chromium over the DevTools pipe, networking off
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("ICL_LENS_NEED_CHROMIUM"):  # CI installs it: there a miss fails
            pytest.fail(message)
        pytest.skip(message)
    b = Chromium(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(run_dir, model, evil_prompt, label_ids, tmp_path_factory):
    """The report and every view saved on its own, all built from payload tokens."""
    out = tmp_path_factory.mktemp("pages")
    dec = il.decompose(model, evil_prompt, label_tokens=label_ids)
    views = {
        "meta_gradient_view": (dec.view_meta_gradients(layer=1, head=0), ["ColoredTokensMulti"]),
        "meta_gradient_views": (viz.meta_gradient_views(dec, k=2), ["ColoredTokensMulti"] * 2),
        "attention_comparison": (
            viz.attention_comparison(model, evil_prompt, layer=1, ft_model=model).view(),
            ["AttentionHeads"],
        ),
        "overview_view": (viz.overview_view(dec.to_frame(), _metrics_frame()), []),
    }
    paths = {
        name: (view.save(out / f"{name}.html"), names) for name, (view, names) in views.items()
    }
    # the top head's transplanted update (interventions) first, then the panels
    report_names = ["ColoredTokensMulti"] * 3 + ["AttentionHeads"]
    paths["report"] = (run_dir / "report.html", report_names)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [
        "report",
        "meta_gradient_view",
        "meta_gradient_views",
        "attention_comparison",
        "overview_view",
    ],
)
def test_page_in_headless_chromium(browser, pages, page):
    path, expected = pages[page]
    result = load_page(browser, path)
    state = result.state
    # circuitsvis components mounted (React rendered into every placeholder)
    assert state["names"] == expected
    assert state["mounted"] == state["components"] == len(expected), state
    if "AttentionHeads" in expected:
        assert state["canvases"] > 0
    if page in ("report", "overview_view"):
        assert state["svgs"] >= (6 if page == "report" else 2)  # matplotlib figures
    # every table fits a 1280 px window: nothing cut off, no sideways scrolling
    assert state["overflowing_tables"] == 0 and not state["page_overflows"], state
    # no console errors, no exceptions, nothing fetched but the file itself
    assert result.errors == []
    assert [u for u in result.requests if not u.startswith(("file:", "data:", "blob:"))] == []
    # the payloads stayed text: no script ran, no element was injected
    assert state["xss"] is None and result.title != "pwned"
    assert state["scripts"] == (1 if expected else 0) and state["images"] == 0
    text = state["text"].replace("\xa0", " ")  # circuitsvis writes spaces as &nbsp;
    if "ColoredTokensMulti" in expected:  # AttentionHeads draws its tokens on a canvas
        assert PAYLOAD_SCRIPT in text and PAYLOAD_IMG in text and PAYLOAD_TIGHT in text
    if page == "report":
        assert PAYLOAD_IMG in text  # the task name and the example query
        assert PAYLOAD_TIGHT in text  # a baseline's name, in the table and the figures
        assert "icl_retest" in text and "uninformative" in text
    # the page and every component have something drawn
    assert_not_blank(result.screenshot, f"{page} screenshot")
    for name, shot in zip(expected, result.component_shots, strict=True):
        assert shot is not None, f"{page}: {name} has no size"
        assert_not_blank(shot, f"{page}: {name}", min_colours=4, min_ink=0.005)


@pytest.mark.slow
def test_the_browser_check_catches_an_unescaped_token(browser, dec, monkeypatch, tmp_path):
    """Negative control: with circuitsvis given raw token strings (no escaping) the
    whitespace-free payload does run, so the checks above have teeth."""
    tokens = list(dec.prompt.str_tokens)
    tokens[2] = PAYLOAD_TIGHT
    evil = dataclasses.replace(
        dec, prompt=dataclasses.replace(dec.prompt, str_tokens=tuple(tokens))
    )
    monkeypatch.setattr(meta_gradients_module, "token_props", list)
    path = viz.meta_gradient_view(evil, 1, 0).save(tmp_path / "unescaped.html")
    result = load_page(browser, path)
    assert result.state["xss"] == 3 and result.state["images"] == 1


def test_report_from_a_comparison(tmp_path, run_dir):
    from icl_lens.study import comparison

    cmp = comparison.Comparison(
        accuracy={"zsl": 0.5, "icl": 0.75, "ft": 0.625},
        frame=_metrics_frame(),
        config={"task_name": "unit", "shots": 3, "seed": 1},
    )
    path = write_report(cmp, tmp_path / "cmp.html", views=ViewData.load(run_dir))
    page = path.read_text()
    assert "icl-lens report: unit" in page and page.count('class="icl-lens-cv"') == 3
    with pytest.raises(ValueError, match="give a path"):
        write_report(cmp)
