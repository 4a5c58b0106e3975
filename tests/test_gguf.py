"""GGUF sources: what counts as one, the conversion cache (keyed by content, atomic,
reused), the missing-extra error, and load_model's dispatch with its dtype. The
conversion itself is transformers' and is tested on the real model in tests/real; here a
stand-in writes a tiny random-init model so the cache logic runs in milliseconds."""

from __future__ import annotations

import json
import os

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
        monkeypatch.setattr(gguf, "_require_reader", lambda: None)

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
    (tmp_path / "p1").write_bytes(b"tail")
    with pytest.raises(ValueError, match="out of order"):
        gguf.gguf_files([tmp_path / "p1", tmp_path / "a.gguf"])
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
