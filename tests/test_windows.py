"""Sliding-window layers that see no demonstration, and top-k cells that cannot speak:
left out of the demonstration-side metrics (Kendall, top-k recall) with a note per
layer and in the overall mean, never a crash."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from icl_lens.analyses import MetricResult, kendall, topk_recall, undefined_notes
from icl_lens.analyses._common import NO_DEMONSTRATION_SEEN

import icl_lens as il
from tests.models import GEMMA3_WINDOW, make_model

TEMPLATE = "Sentence: {text} Label:"
K_NOT_BELOW = "k = {k} is not below the {items} the layer sees"


def long_query_task(path, n_words: int):
    """Validation queries of exactly ``n_words`` words (``n_words + 2`` tokens with
    "Sentence:" and "Label:"); training texts of 2-4 words."""
    rng = random.Random(0)
    rows = []
    for split, n in (("train", 16), ("validation", 6)):
        for i in range(n):
            label = i % 2
            length = n_words if split == "validation" else rng.randrange(2, 5)
            words = [f"w{rng.randrange(45) + 45 * label}" for _ in range(length)]
            rows.append({"text": " ".join(words), "label": ("bad", "good")[label], "split": split})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = il.TaskSpec("long_queries", TEMPLATE, (" bad", " good"), separator=" \n")
    return il.load_task(path, spec=spec)


# ---- the metrics on their own ---------------------------------------------------------


def test_a_layer_that_sees_no_demonstration_token_is_left_out_with_a_note():
    """Layer 1's scores are all -inf (outside its window): Kendall and top-k recall
    (both levels, with their random baselines, which drew an index from an empty row)
    leave it out, say why per layer and in the mean, and average over layer 0 alone."""
    rng = np.random.default_rng(0)
    icl = [rng.normal(size=(2, 12)) for _ in range(4)]
    ft = [rng.normal(size=(2, 12)) for _ in range(4)]
    for a in icl:
        a[1] = -np.inf
    tau = kendall(icl, ft, n_resamples=20).tau_b
    recall = topk_recall(icl, ft, k=3, groups=(4, 4, 4), k_example=1, n_resamples=20)
    for r in (tau, recall.token, recall.example):
        assert np.isnan(r.values[:, 1]).all() and np.isfinite(r.values[:, 0]).all()
        assert r.value == pytest.approx(np.mean(r.values[:, 0]))
        for name, values in r.baseline_values.items():
            assert np.isnan(values[:, 1]).all() and np.isfinite(values[:, 0]).all(), name
        notes = undefined_notes(r)
        frame = r.to_frame()
        observed = frame["baseline"] == "none"
        layer = {la: notes[observed & (frame["layer"] == la)].item() for la in (-1, 0, 1)}
        assert layer == {
            -1: f"layer 1 left out of the mean: {NO_DEMONSTRATION_SEEN}",
            0: None,
            1: f"undefined: {NO_DEMONSTRATION_SEEN}",
        }
        assert notes[~observed].isna().all()


def test_topk_recall_says_why_k_not_below_the_items_is_undefined():
    """k = 12 over 12 tokens (and 3 of 3 demonstrations): both top-k sets are everything,
    the recall would be 1 whatever the scores; a cell that sees fewer tokens than k."""
    icl = [np.arange(12.0).reshape(1, 12)] * 3
    r = topk_recall(icl, icl, k=12, groups=[4, 4, 4], k_example=3, n_resamples=20)
    notes = undefined_notes(r)
    frame = r.to_frame()
    observed = list(notes[frame["baseline"] == "none"])
    token = K_NOT_BELOW.format(k=12, items="demonstration tokens")
    example = K_NOT_BELOW.format(k=3, items="demonstrations")
    assert all(n.startswith(f"undefined: {token}") for n in observed[:2])
    assert all(n.startswith(f"undefined: {example}") for n in observed[2:])
    assert "recall would be 1 whatever the scores" in observed[0]
    # one query whose layer sees only 5 of its 12 tokens, k = 6: that cell alone
    masked = [x.copy() for x in icl]
    masked[1][0, :7] = -np.inf
    r = topk_recall(masked, icl, k=6, n_resamples=20)
    assert np.isnan(r.token.values[:, 0]).tolist() == [False, True, False]
    six = K_NOT_BELOW.format(k=6, items="demonstration tokens")
    assert undefined_notes(r)[0].startswith(f"1 of 3 values left out: {six}")


def test_notes_name_the_layers_left_out_and_count_the_rest():
    """A reason that leaves out all of layer 1 and one value of layer 0: per row, the
    overall mean names layer 1 and counts the other; layer and head rows say how many."""
    values = np.ones((2, 2, 2))
    out = np.zeros((2, 2, 2), dtype=bool)
    out[:, 1] = out[0, 0, 1] = True
    values[out] = np.nan
    r = MetricResult("demo", "v", values, {"random_uniform": values}, undefined={"why": out})
    frame = r.to_frame()
    notes = dict(
        zip(
            zip(frame["baseline"], frame["layer"], frame["head"], strict=True),
            undefined_notes(r),
            strict=True,
        )
    )
    assert {key[1:]: note for key, note in notes.items() if key[0] == "none"} == {
        (-1, -1): "layer 1 left out of the mean; 1 of the other layers' 4 values too: why",
        (0, -1): "1 of 4 values left out: why",
        (1, -1): "undefined: why",
        (0, 0): None,
        (0, 1): "1 of 2 values left out: why",
        (1, 0): "undefined: why",
        (1, 1): "undefined: why",
    }
    assert all(note is None for key, note in notes.items() if key[0] != "none")
    assert r.value == pytest.approx(1.0) and r.n_skipped == 5
    with pytest.raises(ValueError, match="must be NaN"):
        MetricResult("demo", "v", np.ones((2, 2)), undefined={"why": np.ones((2, 2), bool)})


# ---- through compare ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "n_tokens"),
    [("prediction", GEMMA3_WINDOW), ("dai2023", GEMMA3_WINDOW - 1)],
)
def test_compare_with_queries_as_long_as_the_window(tmp_path, protocol, n_tokens):
    """Gemma 3 (window 8): from a query of 8 tokens (7 under dai2023, which records at
    the label word appended after it) the local layers 0 and 2 see no demonstration
    token. compare raised IndexError in top-k recall's random baseline; now Kendall and
    top-k recall leave those layers out, say so, and average over layer 1."""
    task = long_query_task(tmp_path / "long.jsonl", n_words=n_tokens - 2)
    model, hf = make_model("gemma3")
    assert hf.config.layer_types[0] == hf.config.layer_types[2] == "sliding_attention"
    cmp = il.compare(
        model,
        task,
        shots=4,
        seed=1,
        lr_grid=[10.0],
        control=False,
        protocol=protocol,
        n_resamples=20,
        progress=False,
    )
    frame = cmp.metrics()
    observed = frame[(frame["baseline"] == "none") & (frame["head"] == -1)]
    for variant in ("tau_b", "example"):  # over tokens and over demonstrations
        kendall_rows = observed[
            (observed["metric"] == "kendall") & (observed["variant"] == variant)
        ].set_index("layer")
        for layer in (0, 2):
            assert np.isnan(kendall_rows.loc[layer, "value"])
            flag = kendall_rows.loc[layer, "flag"]
            assert flag.startswith(f"undefined: {NO_DEMONSTRATION_SEEN}")
        assert np.isfinite(kendall_rows.loc[1, "value"])
        assert kendall_rows.loc[-1, "value"] == pytest.approx(kendall_rows.loc[1, "value"])
        assert kendall_rows.loc[-1, "flag"].startswith(
            f"layers 0, 2 left out of the mean: {NO_DEMONSTRATION_SEEN}"
        )
    # top-k: the local layers see nothing, the global one fewer than k = 100 tokens
    for variant, k, items in (
        ("token", 100, "demonstration tokens"),
        ("example", 5, "demonstrations"),
    ):
        rows = observed[(observed["metric"] == "topk_recall") & (observed["variant"] == variant)]
        rows = rows.set_index("layer")
        assert rows["value"].isna().all()
        assert rows.loc[0, "flag"] == rows.loc[2, "flag"] == f"undefined: {NO_DEMONSTRATION_SEEN}"
        assert rows.loc[1, "flag"].startswith(f"undefined: {K_NOT_BELOW.format(k=k, items=items)}")
        assert "layers 0, 2 left out of the mean" in rows.loc[-1, "flag"]
    # the retest ceiling (ICL vs ICL in another order) carries the same notes
    retest = frame[(frame["baseline"] == "icl_retest") & (frame["metric"] == "kendall")]
    retest = retest[retest["variant"] == "tau_b"]
    retest = retest[retest["head"] == -1].set_index("layer")
    assert retest.loc[0, "flag"].startswith(f"undefined: {NO_DEMONSTRATION_SEEN}")
