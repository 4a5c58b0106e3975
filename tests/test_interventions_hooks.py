"""The intervention hooks (interventions.md): the identities that prove they act, each
with a deliberately wrong intervention that breaks it, on GPT-2, GPT-NeoX (partial
rotary, rotated by icl-lens on the bridge), Llama (grouped-query) and Gemma 3 (QK-norm,
sliding windows shorter than the prompt, its own score scale), on whichever
TransformerLens line is installed."""

import doctest
import importlib
import warnings
from dataclasses import replace

import pytest
import torch
from icl_lens.hooks import interventions as iv
from icl_lens.hooks.intervention_runner import InterventionRunner
from icl_lens.hooks.interventions import DemoKV, Intervention, InterventionHooks

import icl_lens as il
from tests.models import ARCHITECTURES, GEMMA3_WINDOW, make_model, make_tokenizer

TOL = 1e-5
"""Logits of these models are ~0.3; float32 rounding leaves ~2e-7."""
BROKEN = 100 * TOL
"""A negative control must move the logits at least this much."""

DEMOS = ["Sentence: w1 w2 w3 Label: good", "Sentence: w4 w5 Label: bad", "Sentence: w6 Label: good"]
QUERIES = ["Sentence: w7 w8 Label:", "Sentence: w10 Label:", "Sentence: w11 w12 w13 w14 Label:"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def setup(request):
    model, _ = make_model(request.param)
    adapter = il.adapt(model)
    tok = make_tokenizer()
    prompt = il.build_prompt(tok, DEMOS, QUERIES[0], separator=" \n")
    queries = [torch.tensor(il.data.prompts.encode(tok, t)) for t in QUERIES]
    assert prompt.n_tokens > GEMMA3_WINDOW  # local layers lose demonstrations and BOS
    return request.param, adapter, prompt, queries


def _runner(adapter, prompt, **kwargs):
    return InterventionRunner(
        adapter, prompt.prefix, demo_mask=prompt.demo_mask[: prompt.query_start], **kwargs
    )


def _icl_logits(adapter, prompt, queries):
    """Plain ICL logits at each query's last token: no intervention hook at all."""
    runner = il.PrefixRunner(adapter, prompt.prefix)
    got = runner.run(queries, logit_positions=[[len(q) - 1] for q in queries])
    return got.logits[:, 0]


def _gap(x, y) -> float:
    return (x - y).abs().max().item()


def _wrong_layers(demo: DemoKV) -> DemoKV:
    """The demonstrations' keys and values of the next layer: a transplant wired to the
    wrong layer."""
    roll = lambda xs: xs[1:] + xs[:1]  # noqa: E731
    return replace(demo, keys=roll(demo.keys), values=roll(demo.values))


def _run_hooks(runner, queries, interventions, demo, extra=()):
    """The hooks alone on the runner's cached prefix, one intervention per query row."""
    hooks = InterventionHooks(runner.adapter, interventions, demo).hooks() + list(extra)
    got = runner.prefix_runner.run(
        queries, logit_positions=[[len(q) - 1] for q in queries], hooks=hooks
    )
    return got.logits[:, 0]


def test_restore_all_knockout_none_and_softmax_transplant_equal_icl(setup):
    _, a, prompt, queries = setup
    runner = _runner(a, prompt)
    interventions = [
        iv.icl(a),
        iv.knockout(a, []),
        iv.restore(a, "all"),
        iv.transplant(a, "all", "softmax"),
        iv.blind(a),  # in the same batches: the other rows must not leak into these
        iv.restore(a, iv.all_heads(a)[1:]),  # negative control: one head short
    ]
    out = runner.run(queries, interventions, batch_size=5)
    assert runner.path == "cache"
    icl = _icl_logits(a, prompt, queries)
    for j in range(4):
        assert _gap(out.logits[:, j], icl) <= TOL, out.names[j]
    assert _gap(out.logits[:, 4], icl) > BROKEN
    assert _gap(out.logits[:, 5], icl) > BROKEN


def test_softmax_transplant_with_another_layers_demonstrations_breaks_the_identity(setup):
    _, a, prompt, queries = setup
    runner = _runner(a, prompt)
    demo = runner.demo_kv(queries[0])
    rows = [iv.transplant(a, "all", "softmax")] * len(queries)
    icl = _icl_logits(a, prompt, queries)
    assert _gap(_run_hooks(runner, queries, rows, demo), icl) <= TOL
    assert _gap(_run_hooks(runner, queries, rows, _wrong_layers(demo)), icl) > BROKEN


def test_softmax_transplant_of_any_heads_equals_restoring_them(setup):
    """Transplant(H, softmax) == Restore(H) for every single head, one layer's heads and a
    random set (the heads outside H stay Blind in both); negative control: restoring the
    next head instead."""
    _, a, prompt, queries = setup
    g = torch.Generator().manual_seed(0)
    sets = [[h] for h in iv.all_heads(a)]
    sets.append([(1, h) for h in range(a.n_heads)])
    sets.append([h for h in iv.all_heads(a) if torch.rand(1, generator=g) < 0.5])
    rows = [iv.transplant(a, h, "softmax") for h in sets] + [iv.restore(a, h) for h in sets]
    out = _runner(a, prompt).run(queries, rows, batch_size=16).logits
    n = len(sets)
    for j, heads in enumerate(sets):
        assert _gap(out[:, j], out[:, n + j]) <= TOL, heads
    for j in range(len(iv.all_heads(a)) - 1):
        assert _gap(out[:, j], out[:, n + j + 1]) > BROKEN


def test_knockout_all_blind_and_restore_none_agree(setup):
    _, a, prompt, queries = setup
    out = _runner(a, prompt).run(queries, [iv.blind(a), iv.knockout(a, "all"), iv.restore(a, [])])
    assert _gap(out.logits[:, 1], out.logits[:, 0]) <= TOL
    assert _gap(out.logits[:, 2], out.logits[:, 0]) <= TOL
    assert out.names == ("blind", "knockout(all)", "restore(none)")


def test_knockout_removes_the_demonstration_keys_before_the_value_multiply(setup):
    """The pattern a knocked-out head applies: zero on every demonstration, the rest
    renormalised (at the query positions only); the other heads untouched."""
    _, a, prompt, queries = setup
    runner = _runner(a, prompt, reuse=False)  # full forwards: the prefix rows are visible
    layer, head = a.n_layers - 1, 1
    seen = {}

    def keep(what):
        def hook(x, hook=None):
            seen[what] = x.detach().clone()

        return hook

    extra = [(a.name(layer, w), keep(w)) for w in ("pattern", "z", "v")]
    runner.run(queries[:1], [iv.icl(a), iv.knockout(a, [(layer, head)])], hooks=extra)
    pattern, z, v = seen["pattern"], seen["z"], seen["v"]  # [2, head, pos, key], [2, pos, ..]
    n, demo = prompt.query_start, prompt.demo_mask[: prompt.query_start]
    plain, cut = pattern[0], pattern[1]
    assert torch.equal(cut[:, :n], plain[:, :n])  # the demonstrations' own rows
    assert torch.equal(cut[head - 1], plain[head - 1])  # another head
    assert cut[head, n:, :n][:, demo].abs().max() == 0
    assert _gap(cut[head, n:].sum(-1), torch.ones(1)) <= TOL
    kept = plain[head, n:].clone()
    kept[:, :n][:, demo] = 0
    assert _gap(cut[head, n:], kept / kept.sum(-1, keepdim=True)) <= TOL
    assert plain[head, n:, :n][:, demo].sum(-1).min() > BROKEN
    # the value multiply used the edited pattern
    values = v[1, :, head // a.group_size].float()
    assert _gap(z[1, n:, head].float(), cut[head, n:].float() @ values) <= TOL
    assert _gap(z[1, n:, head], z[0, n:, head]) > BROKEN
    assert torch.equal(z[1, :, head - 1], z[0, :, head - 1])


def linear_attention(adapter, n_prefix):
    """Test-only hooks: at the query positions, softmax replaced by the raw scores q . k
    (the model's scores over its scale, as dW_ICL's terms are), masked keys weigh 0, no
    renormalisation. They run after the intervention hooks, so a knocked-out key (set to
    the most negative number) weighs 0 too."""
    kept = {}
    hooks = []
    for layer in range(adapter.n_layers):

        def on_scores(scores, hook=None, layer=layer):
            first = max(0, n_prefix - (scores.shape[-1] - scores.shape[-2]))
            x = adapter.masked_as_neginf(layer, scores).float()
            knocked_out = scores <= torch.finfo(scores.dtype).min / 2  # the knockout's value
            x = x.masked_fill(knocked_out, float("-inf"))
            weights = (x / adapter.score_scale(layer)).masked_fill(torch.isneginf(x), 0.0)
            kept[layer] = first, weights

        def on_pattern(pattern, hook=None, layer=layer):
            first, weights = kept.pop(layer)
            out = pattern.clone()
            out[:, :, first:] = weights[:, :, first:].to(pattern.dtype)
            return out

        hooks += [(adapter.name(layer, "scores"), on_scores)]
        hooks += [(adapter.name(layer, "pattern"), on_pattern)]
    return hooks


def test_linear_transplant_is_exact_under_linear_attention(setup):
    _, a, prompt, queries = setup
    runner = _runner(a, prompt)
    lin = linear_attention(a, prompt.query_start)
    half = torch.full((a.n_layers, a.n_heads), 0.5)
    interventions = [
        iv.icl(a),
        iv.transplant(a, "all", "linear"),
        iv.transplant(a, "all", "fitted", scales=torch.ones(a.n_layers, a.n_heads)),
        iv.transplant(a, "all", "fitted", scales=half),  # negative control: half the term
        iv.blind(a),
    ]
    out = runner.run(queries, interventions, hooks=lin).logits
    icl = out[:, 0]
    assert _gap(icl, _icl_logits(a, prompt, queries)) > BROKEN  # the linear hook acts
    assert _gap(out[:, 1], icl) <= TOL * max(1.0, icl.abs().max().item())
    assert _gap(out[:, 2], out[:, 1]) == 0
    assert _gap(out[:, 3], icl) > BROKEN
    assert _gap(out[:, 4], icl) > BROKEN
    # negative control: the term from the wrong layer's demonstrations
    demo = _wrong_layers(runner.demo_kv(queries[0]))
    rows = [iv.transplant(a, "all", "linear")] * len(queries)
    assert _gap(_run_hooks(runner, queries, rows, demo, lin), icl) > BROKEN


def test_the_transplanted_term_is_the_decompositions_dW_ICL_q(setup):
    """Layer by layer (earlier layers untouched, so q is ICL's): the transplant moves the
    head outputs at the prediction position by exactly decompose's dW_ICL q."""
    _, a, prompt, _ = setup
    query = prompt.tokens[prompt.query_start :]
    dec = il.decompose(a, prompt)
    runner = _runner(a, prompt)
    for layer in range(a.n_layers):
        heads = torch.zeros(a.n_layers, a.n_heads, dtype=torch.bool)
        heads[layer] = True
        none = torch.zeros_like(heads)
        only_knockout = Intervention(heads, none, none, torch.ones(heads.shape))
        with_term = Intervention(heads, heads, none, torch.ones(heads.shape))
        seen = {}

        def keep(z, hook=None, seen=seen):
            seen["z"] = z.detach().clone()

        runner.run([query], [only_knockout, with_term], hooks=[(a.name(layer, "z"), keep)])
        z = seen["z"][:, -1].float()  # [2, head, d_head] at the prediction position
        term, want = z[1] - z[0], dec.icl[layer, :, 0]
        assert _gap(term, want) <= TOL * max(1.0, want.abs().max().item()), layer
        assert want.abs().max() > BROKEN


def test_blind_is_the_zero_shot_forward_at_the_icl_positions(setup):
    """Blind against an independent forward: BOS + query alone, position ids offset past
    the demonstrations (the bridge only). Gemma 3's local layers count their window in
    sequence slots: there BOS is in the query's window without the demonstrations and
    out of it in Blind, so the identity holds only for a prompt inside the window."""
    arch, a, prompt, queries = setup
    runner = _runner(a, prompt)
    if a.line != "bridge":
        with pytest.raises(ValueError, match="position ids"):
            runner.zero_shot(queries, same_positions=True)
        return
    tok = make_tokenizer()
    if arch == "gemma3":
        far = runner.run(queries, [iv.blind(a)]).logits[:, 0]
        assert _gap(far, runner.zero_shot(queries, same_positions=True)) > BROKEN
        prompt = il.build_prompt(tok, ["w1 good"], "w3 Label:", separator=" \n")
        queries = [prompt.tokens[prompt.query_start :]]
        assert prompt.n_tokens <= GEMMA3_WINDOW
        runner = _runner(a, prompt)
    blind = runner.run(queries, [iv.blind(a)]).logits[:, 0]
    assert _gap(blind, runner.zero_shot(queries, same_positions=True)) <= TOL
    # negative control: the knockout misses the last demonstration token
    wrong = prompt.demo_mask[: prompt.query_start].clone()
    wrong[wrong.nonzero()[-1]] = False
    missed = InterventionRunner(a, prompt.prefix, demo_mask=wrong)
    missed_blind = missed.run(queries, [iv.blind(a)]).logits[:, 0]
    assert _gap(missed_blind, runner.zero_shot(queries, same_positions=True)) > BROKEN


def test_zero_shot_is_the_plain_forward_of_bos_and_query(setup):
    _, a, prompt, queries = setup
    runner = _runner(a, prompt)
    got = runner.zero_shot(queries)
    for i, q in enumerate(queries):
        with a.inference():
            want = a.forward(torch.cat([prompt.prefix[:1], q])[None])[0, -1]
        assert _gap(got[i], want) <= TOL


def test_cached_prefix_equals_full_forwards_and_rows_are_independent(setup):
    _, a, prompt, queries = setup
    scales = torch.linspace(-1.0, 2.0, a.n_layers * a.n_heads).reshape(a.n_layers, a.n_heads)
    interventions = [
        iv.knockout(a, [(0, 1), (a.n_layers - 1, 2)]),
        iv.restore(a, [(1, 0)]),
        iv.transplant(a, [(0, 0), (1, 3)], "linear"),
        iv.transplant(a, "all", "fitted", scales=scales),
        iv.transplant(a, [(a.n_layers - 1, 1)], "softmax"),
        iv.blind(a),
    ]
    cached = _runner(a, prompt)
    got = cached.run(queries, interventions, batch_size=7).logits
    full = _runner(a, prompt, reuse=False)
    want = full.run(queries, interventions).logits
    assert cached.path == "cache" and full.path == "full"
    assert _gap(got, want) <= TOL
    one_by_one = _runner(a, prompt).run(queries, interventions, batch_size=1).logits
    assert _gap(got, one_by_one) <= TOL
    # every intervention does something
    icl = _icl_logits(a, prompt, queries)
    for j in range(len(interventions)):
        assert _gap(got[:, j], icl) > BROKEN, interventions[j].name


def test_bad_interventions_are_refused_early():
    model, _ = make_model("gpt2")
    a = il.adapt(model)
    with pytest.raises(ValueError, match=r"outside the model's 2 layers x 4 heads"):
        iv.knockout(a, [(2, 0)])
    with pytest.raises(ValueError, match="scales"):
        iv.transplant(a, "all", "fitted")
    with pytest.raises(ValueError, match=r"scales must be finite, of shape \[2, 4\]"):
        iv.transplant(a, "all", "fitted", scales=torch.ones(3))
    with pytest.raises(ValueError, match="form must be"):
        iv.transplant(a, "all", "quadratic")
    heads = torch.ones(2, 4, dtype=torch.bool)
    none = torch.zeros_like(heads)
    with pytest.raises(ValueError, match="must also be knocked out"):
        Intervention(none, heads, none, torch.ones(2, 4))
    tok = make_tokenizer()
    prompt = il.build_prompt(tok, ["w1 good"], "w3", separator=" \n")
    with pytest.raises(ValueError, match="demo_mask must cover the prefix"):
        InterventionRunner(a, prompt.prefix, demo_mask=prompt.demo_mask)
    other = il.adapt(make_model("gemma3")[0])
    runner = _runner(a, prompt)
    with pytest.raises(ValueError, match=r"this model has \[2, 4\]"):
        runner.run([prompt.tokens[prompt.query_start :]], [iv.blind(other)])


class _QuietChecker(doctest.OutputChecker):
    """TransformerLens 3 prints where it moves a model it builds: not the example's output."""

    def check_output(self, want, got, optionflags):
        got = "".join(x for x in got.splitlines(True) if not x.startswith("Moving model to"))
        return super().check_output(want, got, optionflags)


@pytest.mark.parametrize("name", ["interventions", "intervention_runner"])
def test_docstring_examples_run(name):
    module = importlib.import_module("icl_lens.hooks." + name)
    runner = doctest.DocTestRunner(_QuietChecker(), optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_prefix_runner_hooks_on_the_first_call_keep_the_cache():
    """Hooks given on a runner's first call must not take part in the cache check (it
    compares against a hook-free full forward): the cache stays, and the hooks act."""
    a = il.adapt(make_model("llama")[0])
    tok = make_tokenizer()
    prompt = il.build_prompt(tok, DEMOS, QUERIES[0], separator=" \n")
    queries = [torch.tensor(il.data.prompts.encode(tok, t)) for t in QUERIES]
    lp = [[len(q) - 1] for q in queries]
    width = max(len(q) for q in queries)

    def add_one_at_the_queries(x, hook=None):  # the query rows on either path
        return torch.cat([x[:, :-width], x[:, -width:] + 1.0], dim=1)

    shift = [(a.name(0, "attn_out"), add_one_at_the_queries)]
    runner = il.PrefixRunner(a, prompt.prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure
        got = runner.run(queries, logit_positions=lp, hooks=shift).logits
    assert runner.path == "cache"
    full = il.PrefixRunner(a, prompt.prefix, reuse=False)
    assert _gap(got, full.run(queries, logit_positions=lp, hooks=shift).logits) <= TOL
    assert _gap(got, full.run(queries, logit_positions=lp).logits) > BROKEN
