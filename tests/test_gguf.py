"""GGUF sources: what counts as one, the conversion cache (keyed by content, atomic,
reused, checked against the hashes written at conversion), the missing-extra error, and
load_model's dispatch with its dtype. A stand-in converter writes a tiny random-init model
so the cache logic runs in milliseconds; the chunk order, the header check and the cache
checks run transformers' real conversion on a tiny Llama written with gguf.GGUFWriter
(tests/real converts the real Gemma 3 270M)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import icl_lens as il
from icl_lens.model import gguf
from tests.models import make_hf_model, make_tokenizer

BODY = bytes(range(256)) * 64


def write_gguf(path, body=BODY):
    path.write_bytes(gguf.GGUF_MAGIC + body)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf.CACHE_ENV, str(root))
    return root


class FakeConverter:
    """Stands in for transformers' reader: saves a tiny Llama per conversion."""

    def __init__(self, monkeypatch, fail_after_writing=False):
        self.calls = []
        self.fail = fail_after_writing
        monkeypatch.setattr(gguf, "_convert", self)
        monkeypatch.setattr(gguf, "_require_reader", lambda why="": None)

    def __call__(self, files, out, *, progress):
        self.calls.append([p.read_bytes() for p in files])
        out.mkdir(parents=True)
        make_hf_model("llama").save_pretrained(out)
        make_tokenizer().save_pretrained(out)
        if self.fail:
            raise KeyboardInterrupt  # killed mid-conversion


def test_what_counts_as_a_gguf_source(tmp_path):
    single = write_gguf(tmp_path / "m.gguf")
    assert gguf.gguf_files(single) == [single] == gguf.gguf_files(str(single))
    folder = tmp_path / "folder"
    folder.mkdir()
    inside = write_gguf(folder / "x.gguf")
    assert gguf.gguf_files(folder) == [inside]
    odd_name = write_gguf(tmp_path / "weights.bin")  # the magic bytes decide, not the name
    assert gguf.gguf_files(odd_name) == [odd_name]
    chunks = [tmp_path / "c.part00", tmp_path / "c.part01"]
    chunks[0].write_bytes(gguf.GGUF_MAGIC + b"a")
    chunks[1].write_bytes(b"b")
    assert gguf.gguf_files([str(c) for c in chunks]) == chunks
    assert gguf.gguf_files("gpt2") is None
    assert gguf.gguf_files(make_tokenizer()) is None
    hf_dir = tmp_path / "hf"
    make_tokenizer().save_pretrained(hf_dir)
    (hf_dir / "config.json").write_text("{}")
    write_gguf(hf_dir / "extra.gguf")
    assert gguf.gguf_files(hf_dir) is None  # a Hugging Face directory stays one


def test_bad_gguf_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gguf.gguf_files(tmp_path / "missing.gguf")
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        gguf.gguf_files(tmp_path)
    (tmp_path / "m.part0").write_bytes(b"tail")
    (tmp_path / "m.part1").write_bytes(gguf.GGUF_MAGIC + b"head")
    with pytest.raises(ValueError, match=r"m.part0 does not start with the GGUF magic.*first"):
        gguf.gguf_files([tmp_path / "m.part1", tmp_path / "m.part0"])
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="magic"):
        gguf.gguf_files(tmp_path / "fake.gguf")


def test_cache_root_honours_the_override_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == tmp_path / "xdg" / "icl-lens"
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "mine"))
    assert gguf.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(gguf.CACHE_ENV)
    assert gguf.cache_root() == gguf.Path.home() / ".cache" / "icl-lens"


def test_conversion_is_cached_by_content(tmp_path, cache, monkeypatch):
    convert = FakeConverter(monkeypatch)
    joined = write_gguf(tmp_path / "m.gguf")
    first = gguf.converted_dir(joined)
    assert len(convert.calls) == 1 and first.parent == cache / "gguf"
    marker = json.loads((first / gguf.MARKER).read_text())
    assert marker["files"] == [str(joined)] and len(marker["sha256"]) == 64
    assert gguf.converted_dir(joined) == first and len(convert.calls) == 1
    # the same bytes as chunks (named like the wheels' chunks) are the same model
    data = joined.read_bytes()
    chunks = [tmp_path / f"m.gguf.part{i:02d}" for i in range(3)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(data[i * 5000 : (i + 1) * 5000 if i < 2 else None])
    assert gguf.converted_dir(chunks) == first and len(convert.calls) == 1
    # one changed byte is a different model: converted again, into its own folder
    write_gguf(joined, BODY[:-1] + b"\x00")
    changed = gguf.converted_dir(joined)
    assert changed != first and len(convert.calls) == 2
    assert convert.calls[-1] == [joined.read_bytes()]


def test_interrupted_conversion_is_not_reused(tmp_path, cache, monkeypatch):
    source = write_gguf(tmp_path / "m.gguf")
    broken = FakeConverter(monkeypatch, fail_after_writing=True)
    with pytest.raises(KeyboardInterrupt):
        gguf.converted_dir(source)
    assert len(broken.calls) == 1
    assert list((cache / "gguf").iterdir()) == []  # no final folder, no partial left
    # a partial folder of a process that died (kill -9: no cleanup) is removed too
    convert = FakeConverter(monkeypatch)
    key = gguf._cache_key([source], gguf._sha256([source]))
    dead = cache / "gguf" / f".partial-{key}-999999999"
    dead.mkdir()
    monkeypatch.setattr(gguf, "_alive", lambda pid: pid != 999999999)
    done = gguf.converted_dir(source)
    assert len(convert.calls) == 1 and (done / gguf.MARKER).is_file()
    assert not any(p.name.startswith(".partial") for p in (cache / "gguf").iterdir())
    # a folder without its marker (e.g. copied in by hand, half) is not trusted
    (done / gguf.MARKER).unlink()
    with pytest.warns(UserWarning, match=f"damaged \\(no {gguf.MARKER}: a conversion cut short"):
        assert gguf.converted_dir(source) == done and len(convert.calls) == 2


def test_missing_extra_names_the_pip_command(tmp_path, cache, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    source = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(ImportError, match=r'pip install "icl-lens\[gguf\]"'):
        il.load_model(source)
    FakeConverter(monkeypatch)
    folder = gguf.converted_dir(source)
    monkeypatch.undo()
    monkeypatch.setenv(gguf.CACHE_ENV, str(cache))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    assert gguf.converted_dir(source) == folder  # a cache hit needs no gguf package


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_load_model_loads_the_converted_model_in_the_asked_dtype(
    tmp_path, cache, monkeypatch, dtype
):
    FakeConverter(monkeypatch)
    source = write_gguf(tmp_path / "m.gguf")
    model = il.load_model([source], dtype=dtype)
    reference = make_hf_model("llama").to(dtype).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        ours, theirs = model(tokens), reference(tokens).logits
    assert ours.dtype == dtype
    assert next(model.parameters()).dtype == dtype
    assert (ours - theirs).abs().max().item() < 1e-5
    assert os.path.samefile(gguf.converted_dir(source).parent, cache / "gguf")


# --- real conversions of a tiny Llama written with gguf.GGUFWriter ------------------------

LLAMA_GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"} | {
    "attn_norm": "input_layernorm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOKENS = torch.tensor([[256, 5, 9, 200, 258, 71]])


def tiny_llama():
    """2 layers, grouped-query attention: 21 tensors in its GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=264,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
    )
    return LlamaForCausalLM(config).eval()


def _llama_cpp_permute(weight, n_heads):
    """llama.cpp stores q/k rows rotary-pair-interleaved; transformers undoes this."""
    w = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, path, nan_in: str | None = None):
    """``model`` as an F32 GGUF with a byte-level BPE tokenizer, as llama.cpp writes it;
    ``nan_in``: a GGUF tensor name whose first weight is written as NaN."""
    import gguf as gguf_package
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    writer = gguf_package.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*bytes_to_unicode().values(), "<s>", "</s>", "Ġa", "Ġb"])
    writer.add_token_types([1] * 256 + [3, 3, 1, 1])
    writer.add_token_merges(["Ġ a", "Ġ b"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    for i in range(c.num_hidden_layers):
        hf |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in LLAMA_GGUF_NAMES.items()}
    weights = model.state_dict()
    for name, hf_name in hf.items():
        w = weights[hf_name + ".weight"].numpy().copy()
        if name.endswith(("attn_q", "attn_k")):
            heads = c.num_attention_heads if name.endswith("q") else c.num_key_value_heads
            w = _llama_cpp_permute(w, heads)
        if name == nan_in:
            w.flat[0] = float("nan")
        writer.add_tensor(name + ".weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama():
    """The tiny Llama and its GGUF file's bytes."""
    model = tiny_llama()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_llama_gguf(model, Path(tmp) / "m.gguf").read_bytes()
    return model, data


def split(data: bytes, folder: Path, names: list[str]) -> list[Path]:
    """``data`` cut into len(names) chunks of (about) equal size, written under ``names``."""
    bounds = [len(data) * i // len(names) for i in range(len(names) + 1)]
    folder.mkdir(exist_ok=True)
    chunks = [folder / name for name in names]
    for chunk, start, stop in zip(chunks, bounds, bounds[1:], strict=False):
        chunk.write_bytes(data[start:stop])
    return chunks


def converted_logits(source):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.converted_dir(source, progress=False))
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def reference_logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def cache_entries(cache):
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").exists() else []


def test_a_whole_gguf_converts_to_the_model_it_was_written_from(tmp_path, cache, llama):
    model, data = llama
    (tmp_path / "m.gguf").write_bytes(data)
    assert (converted_logits(tmp_path / "m.gguf") - reference_logits(model)).abs().max() < 1e-5


def test_chunks_join_in_the_order_their_numbers_say(tmp_path, cache, llama):
    model, data = llama
    reference = reference_logits(model)
    three = split(data, tmp_path / "three", [f"m.gguf.part{i:02d}" for i in range(3)])
    out_of_order = [three[0], three[2], three[1]]  # scrambled 14 of 21 tensors before
    assert (converted_logits(out_of_order) - reference).abs().max() < 1e-5
    # eleven chunks named part1..part11, passed in a shell glob's order
    eleven = split(data, tmp_path / "eleven", [f"m.gguf.part{i}" for i in range(1, 12)])
    globbed = sorted(eleven, key=lambda p: p.name)
    assert [p.name for p in globbed[:3]] == ["m.gguf.part1", "m.gguf.part10", "m.gguf.part11"]
    assert gguf.gguf_files(globbed) == eleven
    assert (converted_logits(globbed) - reference).abs().max() < 1e-5
    assert len(cache_entries(cache)) == 1  # the same bytes: one entry


def test_an_order_the_names_cannot_tell_is_refused(tmp_path, llama):
    _, data = llama
    chunks = split(data, tmp_path, [f"m.gguf.part{i:02d}" for i in range(3)])
    with pytest.raises(ValueError, match=r"part01 is given twice: pass every chunk once"):
        gguf.gguf_files([chunks[0], chunks[1], chunks[1], chunks[2]])
    unnumbered = split(data, tmp_path / "words", ["head", "middle", "tail"])
    assert gguf.gguf_files(unnumbered) == unnumbered  # given in their names' order
    with pytest.raises(ValueError, match=r"cannot tell the order .*head, tail, middle"):
        gguf.gguf_files([unnumbered[0], unnumbered[2], unnumbered[1]])
    (tmp_path / "m.gguf.part1").write_bytes(chunks[1].read_bytes())
    with pytest.raises(ValueError, match=r"part01 and m.gguf.part1 carry the same number"):
        gguf.gguf_files([*chunks, tmp_path / "m.gguf.part1"])
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / chunks[2].name).write_bytes(chunks[2].read_bytes())
    with pytest.raises(ValueError, match=r"several GGUF chunks are named m.gguf.part02"):
        gguf.gguf_files([*chunks, elsewhere / chunks[2].name])


def _damaged_source(kind: str, data: bytes, folder: Path):
    if kind == "missing chunk":
        chunks = split(data, folder, [f"m.gguf.part{i:02d}" for i in range(3)])
        return [chunks[0], chunks[2]]
    if kind == "repeated chunk":
        chunks = split(data, folder, [f"m.gguf.part{i:02d}" for i in range(3)])
        (folder / "m.gguf.part03").write_bytes(chunks[1].read_bytes())
        return [*chunks, folder / "m.gguf.part03"]
    path = folder / "m.gguf"
    path.write_bytes(data if kind == "overlapping tensors" else data[: len(data) // 40])
    if kind == "overlapping tensors":  # the second tensor's offset moved onto the first's
        import gguf as gguf_package

        reader = gguf_package.GGUFReader(path, "r+")
        reader.tensors[1].field.parts[-1][0] = 64
        reader.data.flush()
        del reader
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("header cut short", r"not a well-formed GGUF file: its header .* cannot be read"),
        ("missing chunk", r"m.gguf.part00..m.gguf.part02 joined .* not a well-formed"),
        ("repeated chunk", r"the file goes on for [\d,]+ bytes more: a chunk is repeated"),
        ("overlapping tensors", r"places tensor output_norm.weight at byte .*inside tensor token"),
    ],
)
def test_a_malformed_gguf_is_refused_before_converting(tmp_path, cache, llama, kind, message):
    source = _damaged_source(kind, llama[1], tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        gguf.converted_dir(source, progress=False)
    assert "pass every chunk once, first to last" in str(err.value)
    assert cache_entries(cache) == []  # nothing cached, no partial folder left


def test_a_cut_gguf_is_one_line_on_the_command_line(tmp_path, cache, llama, capsys):
    from icl_lens.cli import main
    from tests.test_cli_hostile import run_args
    from tests.test_compare import write_task

    cut = _damaged_source("header cut short", llama[1], tmp_path)
    task = write_task(tmp_path / "task.jsonl")
    argv = run_args(cut, task, tmp_path / "out", "--label-words", "bad", "good")
    assert main(argv) == 2  # a struct.error traceback before
    err = capsys.readouterr().err
    assert "Traceback" not in err
    converting, error = err.strip().split("\n")  # the progress note, then the error
    assert converting.startswith("icl-lens: converting")
    assert re.fullmatch(
        r"icl-lens run: error: could not load model .*m\.gguf \([\d,]+ bytes\) "
        r"is not a well-formed GGUF file: .* cut short .*",
        error,
    )


def test_weights_that_decode_to_nan_are_refused_not_cached(tmp_path, cache):
    path = write_llama_gguf(tiny_llama(), tmp_path / "m.gguf", nan_in="blk.1.attn_v")
    with pytest.raises(ValueError, match=r"layers.1.self_attn.v_proj.weight holds NaN or inf"):
        gguf.converted_dir(path, progress=False)
    assert cache_entries(cache) == []


def test_an_empty_chunk_list_is_named_as_such():
    with pytest.raises(ValueError, match="an empty list of GGUF chunks was given"):
        il.load_model([])


DAMAGES = {
    "zeroed tensor bytes": lambda d: _overwrite(d / "model.safetensors", b"\x00" * 256),
    "one bit flipped": lambda d: _overwrite(d / "model.safetensors", None),
    "weights half-written": lambda d: _truncate(d / "model.safetensors"),
    "tokenizer deleted": lambda d: (d / "tokenizer.json").unlink(),
    "config deleted": lambda d: (d / "config.json").unlink(),
    "a file added": lambda d: (d / "extra.safetensors").write_bytes(b"{}"),
}


def _overwrite(path: Path, new: bytes | None, at: int = -4096) -> None:
    data = bytearray(path.read_bytes())
    if new is None:
        data[at] ^= 0x10
    else:
        data[at : at + len(new)] = new
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_entry_is_converted_again(tmp_path, cache, llama, monkeypatch, damage):
    model, data = llama
    source = tmp_path / "m.gguf"
    source.write_bytes(data)
    folder = gguf.converted_dir(source, progress=False)
    DAMAGES[damage](folder)
    calls = []
    convert = gguf._convert
    monkeypatch.setattr(gguf, "_convert", lambda *a, **k: calls.append(a) or convert(*a, **k))
    with pytest.warns(UserWarning, match=rf"cached conversion {folder} is damaged \(.+\)"):
        assert gguf.converted_dir(source, progress=False) == folder
    assert len(calls) == 1
    assert (converted_logits(source) - reference_logits(model)).abs().max() < 1e-5
    assert len(calls) == 1 and cache_entries(cache) == [folder.name]


def test_a_damaged_entry_without_the_reader_says_so(tmp_path, cache, llama, monkeypatch):
    import importlib.util

    source = tmp_path / "m.gguf"
    source.write_bytes(llama[1])
    folder = gguf.converted_dir(source, progress=False)
    _overwrite(folder / "model.safetensors", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    message = r"model.safetensors changed since the conversion wrote it\), and converting"
    with pytest.warns(UserWarning), pytest.raises(ImportError, match=message):
        il.load_model(source)
