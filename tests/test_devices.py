"""Models beyond one device and in half precision: ``load_model``'s placement and dtype
pass-through, the identities on a placed model, FT's float32 copies of half-precision
K/V. Tests that need two CUDA devices are skipped without them."""

from __future__ import annotations

import pytest
import torch

import icl_lens as il
import icl_lens.study.finetune as finetune_module
from icl_lens.model.loading import installed_line
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task
from tests.test_duality import independent_relaxed, rel_err

TOL = 1e-5
BIASES = ("bias", "b_K", "b_V")  # K/V bias names on the bridge and on HookedTransformer
BRIDGE = pytest.mark.skipif(
    installed_line() != "bridge", reason="device_map needs TransformerLens 4 (TransformerBridge)"
)
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (runs on a machine with them)"
)
LAYER_MAPS = {  # an explicit per-module map, every layer named
    "gpt2": ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1"]
    + ["transformer.ln_f", "lm_head"],
    "llama": ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1"]
    + ["model.norm", "lm_head"],
}


def demo_prompt():
    demos = [
        "Sentence: w1 w2 w3 Label: good",
        "Sentence: w4 w5 Label: bad",
        "Sentence: w6 Label: good",
    ]
    return il.build_prompt(make_tokenizer(), demos, "Sentence: w7 w8 Label:", separator=" \n")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("placed")
    for arch in LAYER_MAPS:
        make_hf_model(arch).save_pretrained(root / arch)
        make_tokenizer().save_pretrained(root / arch)
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = write_task(tmp_path_factory.mktemp("task") / "two_class.jsonl", n_val=6)
    spec = il.TaskSpec("two_class", TEMPLATE, (" bad", " good"), separator=" \n")
    return il.load_task(path, spec=spec)


def check_identities(model, arch, reference, tol):
    """The duality identities on ``model``; the relaxed form against an independent
    recomputation from ``reference``'s weights."""
    prompt = demo_prompt()
    dec = il.decompose(model, prompt, positions=range(prompt.query_start, prompt.n_tokens))
    assert rel_err(dec.z_split, dec.z) <= tol
    one = il.decompose(model, prompt)
    for layer in range(one.z.shape[0]):
        total = one.head_outputs.sum(1)[layer] + one.b_O[layer, None]
        assert rel_err(total, one.attn_out[layer]) <= tol
        expected = independent_relaxed(reference, prompt, layer, prompt.prediction_position, arch)
        assert rel_err(one.zsl[layer, :, 0] + one.icl[layer, :, 0], expected) <= max(tol, TOL)


@BRIDGE
@pytest.mark.parametrize("arch", sorted(LAYER_MAPS))
@pytest.mark.parametrize("how", ["all_on_cpu", "per_layer"])
def test_a_device_map_keeps_outputs_and_identities(model_dirs, arch, how):
    device_map = {"": "cpu"} if how == "all_on_cpu" else dict.fromkeys(LAYER_MAPS[arch], "cpu")
    placed = il.load_model(model_dirs / arch, device_map=device_map)
    plain = il.load_model(model_dirs / arch)
    tokens = demo_prompt().tokens[None]
    assert torch.equal(placed(tokens), plain(tokens))
    check_identities(placed, arch, plain, TOL)


@BRIDGE
def test_compare_on_a_placed_model_equals_the_plain_one(model_dirs, task):
    opts = dict(shots=3, lr_grid="1e-1", n_resamples=20, progress=False)
    placed = il.load_model(model_dirs / "gpt2", device_map=dict.fromkeys(LAYER_MAPS["gpt2"], "cpu"))
    a = il.compare(placed, task, **opts)
    b = il.compare(il.load_model(model_dirs / "gpt2"), task, **opts)
    assert a.accuracy == b.accuracy
    assert a.metrics().equals(b.metrics())


def test_placement_errors_are_early_and_clear(model_dirs):
    bridge = installed_line() == "bridge"
    tl3 = "device_map and max_memory need TransformerLens 4"
    with pytest.raises(ValueError, match="either device or device_map" if bridge else tl3):
        il.load_model(model_dirs / "gpt2", device="cpu", device_map={"": "cpu"})
    with pytest.raises(ValueError, match="keeps its own placement" if bridge else tl3):
        il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device_map="auto")
    with pytest.raises(ValueError, match="unknown dtype 'half'; choose from float32"):
        il.load_model(model_dirs / "gpt2", dtype="half")


# ---- half precision -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identities_hold_to_one_epsilon_of_the_dtype(arch, dtype):
    """docs/sweeps.md: in half precision the identities hold to the dtype's epsilon
    (bfloat16 7.8e-3, float16 9.8e-4; measured: 1.9e-3 and 2.4e-4), not to 1e-5: the model
    computes z and attn_out in
    half precision, the decomposition re-adds their terms in float32."""
    half = il.load_model(make_hf_model(arch), tokenizer=make_tokenizer(), dtype=dtype)
    assert il.adapt(half).dtype == getattr(torch, dtype)
    reference = il.load_model(make_hf_model(arch), tokenizer=make_tokenizer())
    eps = torch.finfo(getattr(torch, dtype)).eps
    prompt = demo_prompt()
    dec = il.decompose(half, prompt, positions=range(prompt.query_start, prompt.n_tokens))
    assert rel_err(dec.z_split, dec.z) <= eps
    one = il.decompose(half, prompt)
    for layer in range(one.z.shape[0]):
        total = one.head_outputs.sum(1)[layer] + one.b_O[layer, None]
        assert rel_err(total, one.attn_out[layer]) <= eps
        # against float32 weights: the half model's weights are themselves rounded
        expected = independent_relaxed(reference, prompt, layer, prompt.prediction_position, arch)
        assert rel_err(one.zsl[layer, :, 0] + one.icl[layer, :, 0], expected) <= 4 * eps


def test_half_precision_comparison_has_no_nan(task):
    model = il.load_model(make_hf_model("llama"), tokenizer=make_tokenizer(), dtype="bfloat16")
    cmp = il.compare(model, task, shots=3, lr_grid="1e-1", n_resamples=20, progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in cmp.accuracy.values())
    overall = cmp.metrics().query("layer == -1 and head == -1")
    undefined = overall[overall["value"].isna()]
    # only Rec2FTP may be undefined (its own value only when FT fixes no query ZSL gets
    # wrong), and the authors' top-k recall, whose k (100 tokens, 5 demonstrations) is
    # more than 3 shots have
    assert set(undefined["metric"]) <= {"rec2ftp", "topk_recall"}
    own = undefined[(undefined["metric"] == "rec2ftp") & (undefined["baseline"] == "none")]
    if len(own):
        assert cmp.info["rec2ftp_counts"]["n_ft_recovered"] == 0


def _kv_change(dtype: str, lr: float) -> torch.Tensor:
    model = il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), dtype=dtype)
    adapter = il.adapt(model)
    before = {n: p.detach().float().clone() for n, p in adapter.kv_parameters(model)}
    prompt = il.build_prompt(
        make_tokenizer(),
        ["Sentence: w1 w2 w3 Label: good", "Sentence: w4 w5 Label: bad"] * 4,
        "Sentence: w7 Label:",
        separator=" \n",
    )
    ft = il.finetune(model, prompt, lr=lr)
    assert not ft.diverged
    after = adapter.kv_parameters(ft.model)
    assert all(p.dtype == getattr(torch, dtype) for _, p in after)
    weights = [(n, p) for n, p in after if n.rsplit(".", 1)[-1].lstrip("_") not in BIASES]
    changes = [(p.detach().float() - before[n]).flatten() for n, p in weights]
    return torch.cat(changes)


def test_ft_of_a_bfloat16_model_accumulates_in_float32(monkeypatch):
    """Each step's update is mostly below bfloat16's resolution: trained in place, the
    K/V change of 8 steps is 19% off float32's; with float32 copies 5% (measured)."""
    lr = 1e-2
    exact = _kv_change("float32", lr)
    with_copies = _kv_change("bfloat16", lr)
    monkeypatch.setattr(finetune_module, "HALF", ())  # train the bfloat16 weights in place
    in_place = _kv_change("bfloat16", lr)
    err_copies, err_in_place = rel_err(with_copies, exact), rel_err(in_place, exact)
    assert err_copies <= 0.1 and err_copies <= err_in_place / 2


# ---- two CUDA devices -----------------------------------------------------------------


def split_map(arch: str) -> dict:
    """The first half of the modules on cuda:0, the rest on cuda:1 (tied GPT-2 embedding
    and unembedding together)."""
    names = LAYER_MAPS[arch]
    first = set(names[: len(names) // 2]) | ({"lm_head"} if arch == "gpt2" else set())
    return {n: 0 if n in first else 1 for n in names}


@TWO_GPUS
@BRIDGE
@pytest.mark.parametrize("arch", sorted(LAYER_MAPS))
def test_two_gpus_identities_prefix_reuse_and_ft(model_dirs, arch):
    placed = il.load_model(model_dirs / arch, device_map=split_map(arch))
    assert il.adapt(placed).model.cfg.n_devices == 2
    single = il.load_model(model_dirs / arch, device="cuda:0")
    reference = il.load_model(model_dirs / arch)
    check_identities(placed, arch, reference, TOL)
    prompt = demo_prompt()
    queries = [prompt.tokens[prompt.query_start :]]
    cached = il.PrefixRunner(il.adapt(placed), prompt.prefix)
    out = cached.run(queries, what={"attn_out", "q"})
    assert cached.path == "cache"
    full = il.PrefixRunner(il.adapt(single), prompt.prefix, reuse=False).run(queries, what={"q"})
    n = int(out.lengths[0])
    assert (out.logits[0, :n].cpu() - full.logits[0, :n].cpu()).abs().max() <= 1e-4
    a, b = il.finetune(placed, prompt, lr=0.1), il.finetune(single, prompt, lr=0.1)
    assert torch.allclose(a.losses, b.losses, rtol=1e-5)
    assert rel_err(a.train_queries, b.train_queries) <= TOL


@TWO_GPUS
@BRIDGE
def test_two_gpus_compare_equals_one_gpu(model_dirs, task):
    opts = dict(shots=3, lr_grid="1e-1", n_resamples=20, progress=False)
    a = il.compare(il.load_model(model_dirs / "llama", n_devices=2), task, **opts)
    b = il.compare(il.load_model(model_dirs / "llama", device="cuda:0"), task, **opts)
    assert a.accuracy == b.accuracy
    pd_a, pd_b = a.metrics(), b.metrics()
    assert (pd_a["value"] - pd_b["value"]).abs().max() <= 1e-4
