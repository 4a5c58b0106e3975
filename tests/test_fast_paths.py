"""Guards for the performance fixes: the cheap checks still catch what they must."""

import pytest
import torch

from icl_lens.study.finetune import _finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_divergence_check_sees_nan_and_inf_in_strided_weights(bad):
    joint = torch.randn(8, 24)
    k_view = joint[:, 8:16].t()  # a K weight sliced out of a joint QKV weight
    params = [torch.randn(3), k_view, torch.zeros(0)]
    assert _finite(params)
    k_view[2, 5] = bad
    assert not _finite(params)
    assert _finite([])


def _tiny_setup():
    import icl_lens as il
    from icl_lens.study.predict import label_tokens, predict_queries
    from tests.models import make_model

    model = make_model("gpt2", n_layers=1)[0]
    prompt = il.build_prompt(
        model.tokenizer, ["w1 w2 good", "w3 bad", "w4 w5 good"], "w6", separator=" \n"
    )
    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"))
    labels = label_tokens(model.tokenizer, spec)
    queries = [torch.tensor([92, 6, 93]), torch.tensor([92, 70, 93]), torch.tensor([92, 8, 93])]

    def evaluate(m):
        return predict_queries(m, prompt.tokens[:1], queries, labels, gold=[1, 0, 1])

    return model, prompt, evaluate


def test_the_kept_best_trial_equals_training_it_again():
    from icl_lens.model.adapter import adapt
    from icl_lens.study.finetune import finetune
    from icl_lens.study.lr_search import BestTrial, run_trial, select_lr

    model, prompt, evaluate = _tiny_setup()
    kept = BestTrial()
    trials = [run_trial(model, prompt, lr, evaluate, keep=kept.offer) for lr in (0.3, 0.01, 3.0)]
    best = select_lr(trials)
    assert kept.take(model, 123.0) is None  # not a kept learning rate
    rebuilt = kept.take(model, best.lr)
    again = finetune(model, prompt, lr=best.lr, record_queries=True)
    assert rebuilt.lr == best.lr and not rebuilt.diverged
    assert torch.equal(rebuilt.losses, again.losses)
    assert torch.equal(rebuilt.train_queries, again.train_queries)
    want = again.model.state_dict()
    for name, x in rebuilt.model.state_dict().items():
        assert torch.equal(x, want[name]), name
    assert not any(p.requires_grad for p in rebuilt.model.parameters())
    assert not rebuilt.model.training
    original = dict(adapt(model).kv_parameters())
    trained = adapt(model).kv_parameters(rebuilt.model)
    assert any(not torch.equal(p, original[name]) for name, p in trained)


def test_compare_trains_the_chosen_lr_once(monkeypatch, tmp_path):
    import icl_lens as il
    from icl_lens.data.task_sources import load_task
    from tests.test_compare import TEMPLATE, write_task

    compare_module = __import__("importlib").import_module("icl_lens.study.compare")
    stages_module = __import__("importlib").import_module("icl_lens.study.pipeline")
    model, _, _ = _tiny_setup()
    spec = il.TaskSpec("two_class", TEMPLATE, (" bad", " good"), separator=" \n")
    task = load_task(write_task(tmp_path / "t.jsonl"), spec=spec)
    calls = []
    real = stages_module.finetune
    monkeypatch.setattr(stages_module, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(shots=4, lr_grid="1e-2,1e-1", lr_extend=0, control=False, n_resamples=10)
    cmp = compare_module.compare(model, task, retest=False, progress=False, **kw)
    assert calls == []  # the grid's trials train (in run_trial); the chosen lr is reused
    assert cmp.lr in (1e-2, 1e-1)
    compare_module.compare(model, task, progress=False, **kw)
    assert calls == [1]  # only FT in the other order, for the ft_retest ceiling


def test_bridge_attention_keeps_no_pattern_after_its_forward():
    """TL 4.3's bridge attention kept its last pattern on every layer (all layers' at
    once during a forward, and their autograd graph after a training step)."""
    from icl_lens.model.loading import installed_line
    from tests.models import make_model

    if installed_line() != "bridge":
        pytest.skip("TransformerBridge (TransformerLens 4) only")
    model = make_model("gpt2")[0]
    seen = []
    with (
        torch.no_grad(),
        model.hooks(
            fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook=None: seen.append(x.shape))]
        ),
    ):
        model(torch.tensor([[1, 5, 6, 7]]))
    assert seen  # hooks still see the pattern
    assert all(getattr(block.attn, "_pattern", None) is None for block in model.blocks)


def test_later_batches_of_other_widths_stay_exact():
    """The prefix cache is rebuilt for every batch and never extended."""
    import icl_lens as il
    from tests.models import make_model, make_tokenizer

    for arch in ("gpt2", "llama"):
        model = make_model(arch)[0]
        adapter = il.adapt(model)
        tok = make_tokenizer()
        prefix = il.build_prompt(tok, ["w1 w2 good", "w3 bad"], "w0", separator=" \n").prefix
        queries = [
            torch.tensor(il.data.prompts.encode(tok, " ".join(f"w{j}" for j in range(10, 10 + n))))
            for n in (2, 7, 3, 9, 1, 4)
        ]
        full = il.PrefixRunner(adapter, prefix, reuse=False).run(queries, what={"attn_out"})
        runner = il.PrefixRunner(adapter, prefix)
        got = []
        for chunk in (queries[:1], queries[1:4], queries[4:]):
            out = runner.run(
                chunk, what={"attn_out"}, logit_positions=[[len(q) - 1] for q in chunk]
            )
            got.append((out.logits[:, 0], out.values["attn_out", 1][:, 0]))
        assert runner.path == "cache"
        logits = torch.cat([g[0] for g in got])
        attn = torch.cat([g[1] for g in got])
        for b, q in enumerate(queries):
            assert (logits[b] - full.logits[b, len(q) - 1]).abs().max() <= 1e-4
            assert (attn[b] - full.values["attn_out", 1][b, 0]).abs().max() <= 1e-4
