"""Prefix reuse pays for the demonstrations once, and logits only where asked."""

import warnings

import pytest
import torch

import icl_lens as il
from tests.models import ARCHITECTURES, make_model, make_tokenizer


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return make_model(request.param)[0]


def _prefix_and_queries():
    tok = make_tokenizer()
    demos = ["Sentence: w1 w2 Label: good", "Sentence: w3 Label: bad", "Sentence: w4 Label: good"]
    prefix = il.build_prompt(tok, demos, "w0", separator=" \n").prefix
    texts = ["Sentence: w7 Label:", "Sentence: w10 w11 w12 w13 Label:", "Sentence: w9 w8 Label:"]
    return prefix, [torch.tensor(il.data.prompts.encode(tok, t)) for t in texts]


def test_logit_positions_select_the_same_logits(model):
    adapter = il.adapt(model)
    prefix, queries = _prefix_and_queries()
    full = il.PrefixRunner(adapter, prefix, reuse=False).run(queries)
    wanted = [[len(q) - 1, 0] for q in queries]
    for reuse in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            runner = il.PrefixRunner(adapter, prefix, reuse=reuse)
            for _ in range(2):  # the verifying first call and a cached one
                out = runner.run(queries, what={"attn_out"}, logit_positions=wanted)
                assert out.logits.shape[:2] == (len(queries), 2)
                for b, pos in enumerate(wanted):
                    want = full.logits[b, pos]
                    assert (out.logits[b] - want).abs().max() <= 1e-4
        assert runner.path == ("cache" if reuse else "full")


def test_the_prefix_runs_once_and_the_check_costs_one_query(model):
    """The first batch's check against a full forward is the pass that fills the cache:
    the model sees the prefix once, then only query tokens."""
    adapter = il.adapt(model)
    prefix, queries = _prefix_and_queries()
    seen = []

    def count(x, hook=None):
        seen.append(x.shape[0] * x.shape[1])

    runner = il.PrefixRunner(adapter, prefix)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
        runner.run(queries[:2], what={"q", "scores", "attn_out"})
        runner.run(queries[2:], what={"q", "scores", "attn_out"})
    assert runner.path == "cache"
    width = max(len(q) for q in queries[:2])
    assert seen == [len(prefix) + len(queries[0]), 2 * width, len(queries[2])]


def test_record_unembeds_only_the_prediction(model):
    """records.record and predict_queries ask for the prediction position's logits."""
    from icl_lens.study.predict import label_tokens, predict_queries
    from icl_lens.study.records import record

    tok = make_tokenizer()
    spec = il.TaskSpec("demo", "Sentence: {text} Label:", (" bad", " good"))
    labels = label_tokens(tok, spec)
    prefix, queries = _prefix_and_queries()
    shapes = []

    def unembed(x, hook=None):
        shapes.append(tuple(x.shape[:2]))

    with model.hooks(fwd_hooks=[("unembed.hook_out", unembed)]):
        rec = record(model, prefix, queries, labels, batch_size=2)
        pred = predict_queries(model, prefix, queries, labels, batch_size=2)
    assert all(n == 1 for _, n in shapes)
    assert torch.allclose(rec.class_scores, pred.scores, atol=1e-5)
    full = il.PrefixRunner(il.adapt(model), prefix, reuse=False).run(queries)
    for b, q in enumerate(queries):
        log_probs = torch.log_softmax(full.logits[b, len(q) - 1].float(), dim=-1)
        assert (pred.scores[b] - log_probs[list(labels.first)]).abs().max() <= 1e-4
