"""The decomposition's public surface refuses what it would otherwise get wrong (issue 20):
layers and heads are the model's numbers everywhere (a subset never shifts them), a
repeated layer or position is refused instead of doubled, bools, floats and strings are
refused instead of read as 1, cut to an int, or reported as "not decomposed", equal
label tokens are refused instead of giving effects that are all exactly zero, and a
prompt with float or 2-D token ids, or spans that contradict it, is refused where it is
made. Numpy and tensor integers work like ints."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch

import icl_lens as il
from icl_lens.views.heatmaps import plot_metric_heads
from icl_lens.views.meta_gradients import meta_gradient_views, meta_gradients, top_heads
from tests.models import make_model, make_tokenizer

N_LAYERS, N_HEADS = 3, 4


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2", n_layers=N_LAYERS)[0]


@pytest.fixture(scope="module")
def prompt():
    prompt = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3 w4", separator=" \n")
    assert (prompt.query_start, prompt.n_tokens) == (7, 9)  # the query: positions 7 and 8
    return prompt


@pytest.fixture(scope="module")
def full(model, prompt):
    return il.decompose(model, prompt, positions=[7, 8], label_tokens=(96, 95))


PER_HEAD_METHODS = (
    "contributions",
    "token_effects",
    "index_of",
    "head_to_resid",
    "view_meta_gradients",
    "meta_gradients",
)


def call(dec, method: str, *args):
    """One of the public methods that take (layer, head, n), called with ``args``."""
    if method == "head_to_resid":
        return dec.head_to_resid(*args, *[0][: 3 - len(args)], torch.ones(dec.zsl.shape[-1]))
    if method == "meta_gradients":
        return meta_gradients(dec, *args)
    return getattr(dec, method)(*args)


# ---- layers: the model's numbers, each once ---------------------------------------------


def test_a_subset_is_looked_up_by_layer_number(model, prompt, full):
    """layers=[1, 2]: contributions(layer=1) gave layer 2's terms; layers=[2]: layer 2
    raised a bare IndexError."""
    for layers in ([1, 2], [2]):
        sub = il.decompose(model, prompt, positions=[7, 8], layers=layers, label_tokens=(96, 95))
        for layer in layers:
            torch.testing.assert_close(
                sub.contributions(layer, 3, 1), full.contributions(layer, 3, 1)
            )
            torch.testing.assert_close(sub.token_effects(layer, 0), full.token_effects(layer, 0))
        assert set(top_heads(sub, k=N_HEADS)) <= {(la, h) for la in layers for h in range(N_HEADS)}
        with pytest.raises(
            IndexError, match=rf"layer 0 was not decomposed: choose one of {re.escape(str(layers))}"
        ):
            sub.contributions(0, 0)


@pytest.mark.parametrize(
    "layers, error, message",
    [
        ([0, 0], ValueError, r"layers \[0, 0\] repeat \[0\].*pass each once, e.g. layers=\[0\]"),
        ([2, 1, 2], ValueError, r"repeat \[2\].*layers=\[2, 1\]"),
        ([], ValueError, "layers is empty"),
        (
            [-1],
            ValueError,
            r"layers \[-1\] out of range: .*numbered 0..2 \(not counted from the end",
        ),
        ([3], ValueError, r"layers \[3\] out of range: the model has 3 layers"),
        ([True], TypeError, "each of layers must be an int, got True"),
        ([1.0], TypeError, "each of layers must be an int, got 1.0"),
        ("1", TypeError, "layers must be a list of ints, e.g. layers=.*got '1'"),
        (1, TypeError, "layers must be a list of ints"),
        (torch.tensor(1), TypeError, "layers must be a list of ints"),
    ],
)
def test_bad_layers_are_refused_before_the_forward(model, prompt, layers, error, message):
    with pytest.raises(error, match=message):
        il.decompose(model, prompt, layers=layers)


def test_numpy_and_tensor_layers_work_like_ints(model, prompt):
    as_list = il.decompose(model, prompt, layers=[2, 0])
    for layers in (np.array([2, 0]), torch.tensor([2, 0]), (np.int64(2), 0), range(2, -1, -2)):
        dec = il.decompose(model, prompt, layers=layers)
        assert dec.layers.tolist() == [2, 0]
        torch.testing.assert_close(dec.icl, as_list.icl)
    assert sorted(as_list.to_frame()["layer"].unique()) == [0, 2]


# ---- positions: query token positions, each once ------------------------------------------


@pytest.mark.parametrize(
    "positions, error, message",
    [
        ([8, 8], ValueError, r"positions \[8, 8\] repeat \[8\].*positions=\[8\]"),
        ([], ValueError, "positions is empty"),
        ([7.5], TypeError, "each of positions must be an int, got 7.5"),
        ([True], TypeError, "each of positions must be an int, got True"),
        (8, TypeError, r"positions must be a list of ints, e.g. positions=\[8\]; got 8"),
        ([-1], IndexError, r"not query positions: choose from 7..8 .*not from the end"),
    ],
)
def test_bad_positions_are_refused(model, prompt, positions, error, message):
    with pytest.raises(error, match=message):
        il.decompose(model, prompt, positions=positions)


# ---- label tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [(5, 5), (np.int64(5), 5), torch.tensor([5, 5])])
def test_equal_label_tokens_are_refused(model, prompt, labels):
    """They gave every effect exactly 0 without a word."""
    with pytest.raises(ValueError, match="both token id 5: the effect is logit.*difference"):
        il.decompose(model, prompt, label_tokens=labels)


# ---- every per-head method: types and ranges ----------------------------------------------


@pytest.mark.parametrize("method", PER_HEAD_METHODS)
@pytest.mark.parametrize(
    "args, error, message",
    [
        (("1", 0), TypeError, r"layer must be an int, got '1' \(str\)"),
        ((True, 0), TypeError, "layer must be an int, got True"),
        ((1.0, 0), TypeError, "layer must be an int, got 1.0"),
        ((-1, 0), IndexError, "layer -1 was not decomposed: .*counted from 0, not from the end"),
        ((3, 0), IndexError, r"layer 3 was not decomposed: choose one of \[0, 1, 2\]"),
        ((1, N_HEADS), IndexError, rf"head {N_HEADS} out of range: .*{N_HEADS} heads"),
        ((1, -1), IndexError, "head -1 out of range"),
        ((1, True), TypeError, "head must be an int, got True"),
        ((1, 0, 2), IndexError, r"n=2 out of range: n counts the recorded positions \[7, 8\]"),
        ((1, 0, -1), IndexError, "n=-1 out of range"),
        ((1, 0, 1.0), TypeError, "n must be an int"),
    ],
)
def test_every_per_head_method_refuses_what_it_would_misread(full, method, args, error, message):
    """Before: layer='1' said "layer 1 was not decomposed", layer=-1 and head=-1
    silently wrapped around, layer=True read as 1 in the view and as a mask elsewhere,
    head=True failed inside a matmul, head or n out of range were bare torch errors."""
    with pytest.raises(error, match=message):
        call(full, method, *args)


def test_numpy_and_tensor_numbers_work_like_ints(full):
    for method in ("contributions", "token_effects", "index_of", "head_to_resid"):
        expected = call(full, method, 1, 2, 1)
        for args in (
            (np.int64(1), np.int32(2), np.int64(1)),
            (torch.tensor(1), 2, torch.tensor(1)),
        ):
            got = call(full, method, *args)
            assert (got == expected) if isinstance(got, tuple) else torch.equal(got, expected)
    a, b = meta_gradients(full, np.int64(1), 2), meta_gradients(full, 1, 2)
    assert a.values == b.values and a.layer == 1


def test_top_heads_and_the_caption_labels_are_checked(full):
    """Before: k=0 gave no heads and k=-1 all but the last; n=5 a bare torch error;
    by="layer" sorted heads by layer number; labels="good" captioned "o vs g"."""
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_heads(full, k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_heads(full, k=-1)
    with pytest.raises(IndexError, match="n=5 out of range"):
        top_heads(full, k=2, n=5)
    with pytest.raises(KeyError, match="unknown column 'layer'"):
        top_heads(full, by="layer")
    assert top_heads(full, k=2, n=np.int64(1)) == top_heads(full, k=2, n=1)
    with pytest.raises(ValueError, match="labels must name the two label words"):
        meta_gradients(full, 1, 0, labels="good")


def test_view_lists_and_figure_options_are_checked(full):
    """Before: heads=(1, 0) failed unpacking an int; heads=[] gave an empty page; a
    single column name was read as its characters; ncols=0 divided by zero."""
    for heads in [(1, 0), [], [(1, 0, 0)]]:
        with pytest.raises(ValueError, match=r"heads must be a non-empty list of \(layer, head\)"):
            meta_gradient_views(full, heads=heads)
    assert len(meta_gradient_views(full, heads=[(2, 1)]).components) == 1
    with pytest.raises(
        TypeError, match=r"columns must be a list of names, e.g. columns=\['icl_norm'\]"
    ):
        full.plot_heads("icl_norm")
    for ncols in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ncols must be a positive int"):
            full.plot_heads(ncols=ncols)
    assert len(full.plot_heads(["icl_norm", "demo_mass"], ncols=np.int64(1)).axes) >= 2
    with pytest.raises(TypeError, match="only must be a list of names"):
        plot_metric_heads(pd.DataFrame(), only="simam")


# ---- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda p: dict(tokens=p.tokens.float()),
            TypeError,
            r"integer token ids, got a torch.float32 tensor.*dtype=torch.long",
        ),
        (lambda p: dict(tokens=p.tokens.tolist()), TypeError, "must be a tensor of token ids"),
        (lambda p: dict(tokens=p.tokens[None]), ValueError, r"got shape \(1, 9\)"),
        (lambda p: dict(query_start=p.n_tokens), ValueError, "query needs at least one token"),
        (lambda p: dict(query_start=5), ValueError, "demo_spans .* before the query"),
        (lambda p: dict(demo_spans=((1, 5), (4, 7))), ValueError, "not overlapping"),
        (lambda p: dict(str_tokens=("a", "b")), ValueError, "2 strings for 9 token ids"),
    ],
)
def test_a_contradictory_prompt_is_refused_where_it_is_made(prompt, change, error, message):
    """A float-token prompt failed inside the decomposition with a shape mismatch
    between two tensors; a 2-D one said position 0 was not a query position."""
    with pytest.raises(error, match=message):
        dataclasses.replace(prompt, **change(prompt))


def test_a_prompt_of_int32_ids_still_works(model, prompt, full):
    dec = il.decompose(
        model, dataclasses.replace(prompt, tokens=prompt.tokens.int()), positions=[7, 8]
    )
    torch.testing.assert_close(dec.icl, full.icl)


def test_prompt_builders_refuse_a_text_where_a_list_belongs():
    tok = make_tokenizer()
    with pytest.raises(TypeError, match="got a single str .*wrap it"):
        il.build_prompt(tok, "w1 good", "w3")  # was: one demonstration per character
    with pytest.raises(TypeError, match="each demonstration must be a formatted text"):
        il.build_prompt(tok, ["w1 good", 3], "w3")
    with pytest.raises(TypeError, match="query must be the query's formatted text"):
        il.build_prompt(tok, ["w1 good"], ["w3"])
    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"))
    with pytest.raises(TypeError, match="demonstrations must be a list of Examples"):
        il.task_prompt(tok, spec, "w1 good", "w3")
    with pytest.raises(TypeError, match="query must be an Example or the query's text"):
        il.task_prompt(tok, spec, [], 3)
