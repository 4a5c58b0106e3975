"""GGUF checkpoints (llama.cpp's format) as Hugging Face directories, converted once and
cached, so :func:`icl_lens.load_model` can load them like any local model.

A GGUF source is a ``.gguf`` file (any file that starts with the GGUF magic bytes), a
directory holding exactly one ``.gguf`` file, or a list of chunk files that concatenate
to one GGUF file, joined in the order their numbered names say
(:mod:`icl_lens.model.gguf_chunks`, which also checks that the joined bytes are one
well-formed GGUF before converting). transformers' GGUF reader
(``from_pretrained(dir, gguf_file=...)``, needs ``pip install "icl-lens[gguf]"``)
dequantises every weight to float32; the model and its tokenizer are saved as a plain
Hugging Face directory under :func:`cache_root` (``$ICL_LENS_CACHE``, else
``$XDG_CACHE_HOME/icl-lens``, else ``~/.cache/icl-lens``), in a folder named by the
file's SHA-256 and the transformers version, so a changed file or a new reader is never
served a stale conversion. The folder appears by an atomic rename once complete; an
interrupted conversion leaves only a ``.partial-*`` folder, removed by the next one,
and a conversion whose weights decode to NaN or inf is refused, never cached. The
marker written last records the SHA-256 of every file of the conversion; a cache hit
hashes them again (about 1.9 s more per load of Gemma 3 270M's 1.1 GB) and converts
again, with a warning saying what was wrong, when a file is missing, added or changed.
A cache hit reads only the GGUF's bytes (to hash them) and the converted folder: no
``gguf`` package needed.

>>> import icl_lens as il
>>> model = il.load_model("path/to/model.gguf", dtype=torch.bfloat16)  # doctest: +SKIP
>>> model = il.load_model(["m.gguf.part00", "m.gguf.part01"])          # doctest: +SKIP

Gemma 3 270M ships as GGUF chunks in pip wheels: see :mod:`icl_lens.model.wheels`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from icl_lens.model.gguf_chunks import EACH_ONCE, check_layout, chunk_order

__all__ = [
    "cache_root",
    "converted_dir",
    "gguf_files",
]

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "ICL_LENS_CACHE"
PIP_HINT = 'pip install "icl-lens[gguf]"'
MARKER = "icl-lens-gguf.json"
"""Written last into a converted folder: what it was converted from, and the hashes of
what the conversion wrote (under ``CONTENTS``)."""
CONTENTS = "contents_sha256"


def cache_root() -> Path:
    """Where converted models live: ``$ICL_LENS_CACHE``, else ``$XDG_CACHE_HOME/icl-lens``,
    else ``~/.cache/icl-lens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "icl-lens"


def _starts_with_magic(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def gguf_files(source) -> list[Path] | None:
    """The file(s) of a GGUF source, in order, or ``None`` when ``source`` is not one (a
    hub name, a Hugging Face directory, an in-memory model). Raises ``FileNotFoundError``
    or ``ValueError`` for a GGUF source that cannot be read as one.

    >>> gguf_files("gpt2") is None
    True
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            if len(found) > 1:
                raise ValueError(
                    f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found)});"
                    " pass the one to load"
                )
            if found and not (path / "config.json").exists():
                return _checked(found)
            return None
        if path.suffix.lower() == ".gguf" or (path.is_file() and _starts_with_magic(path)):
            return _checked([path])
        return None
    if isinstance(source, Sequence) and not source:
        raise ValueError(
            "an empty list of GGUF chunks was given: pass the chunk files "
            "(load_model(['m.gguf.part00', 'm.gguf.part01']), or --model with each file), "
            "a .gguf file, a model directory or a hub name"
        )
    if isinstance(source, Sequence) and all(isinstance(p, str | os.PathLike) for p in source):
        return _checked([Path(p).expanduser() for p in source])
    return None


def _checked(files: list[Path]) -> list[Path]:
    """``files`` that exist, first to last, the first one starting like a GGUF file."""
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF file(s) not found: {', '.join(missing)}")
    files = chunk_order(files)
    if not _starts_with_magic(files[0]):
        first = f" (the first chunk by its name; {EACH_ONCE})" if len(files) > 1 else ""
        raise ValueError(
            f"{files[0]} does not start with the GGUF magic bytes: not a GGUF file{first}"
        )
    return files


def _sha256(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _stem(files: Sequence[Path]) -> str:
    name = re.sub(r"\.part\d+$", "", files[0].name)
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def _cache_key(files: Sequence[Path], digest: str) -> str:
    """The cache folder's name: the file's name, its content hash and the reader version."""
    import transformers

    return f"{_stem(files)}-{digest[:16]}-tf{transformers.__version__}"


def converted_dir(source, *, progress: bool = True) -> Path:
    """The cached Hugging Face directory of a GGUF source, converting it on first use
    and again when the cached files are not those the conversion wrote.

    >>> d = converted_dir("path/to/model.gguf")  # doctest: +SKIP
    >>> sorted(p.name for p in d.iterdir())[:2]  # doctest: +SKIP
    ['config.json', 'generation_config.json']
    """
    files = gguf_files(source)
    if files is None:
        raise ValueError(f"{source!r} is not a GGUF file, a folder with one, or a chunk list")
    import transformers

    digest = _sha256(files)
    key = _cache_key(files, digest)
    root = cache_root() / "gguf"
    final = root / key
    damage = _entry_damage(final, digest) if final.exists() else None
    if final.exists() and damage is None:
        return final
    if damage:
        warnings.warn(
            f"the cached conversion {final} is damaged ({damage}); converting {files[0]} again",
            stacklevel=2,
        )
    _require_reader(f"the cached conversion {final} is damaged ({damage}), and " if damage else "")
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, key)
    partial = root / f".partial-{key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _convert(files, partial, progress=progress)
        marker = {
            "sha256": digest,
            "files": [str(p) for p in files],
            "bytes": [p.stat().st_size for p in files],
            "transformers": transformers.__version__,
            CONTENTS: {p.name: _sha256([p]) for p in sorted(partial.iterdir())},
        }
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        if final.exists() and _entry_damage(final, digest) is None:  # another process won
            shutil.rmtree(partial)
            return final
        shutil.rmtree(final, ignore_errors=True)  # a damaged, incomplete or foreign folder
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _entry_damage(folder: Path, digest: str) -> str | None:
    """What is wrong with the cache entry ``folder`` for the GGUF hashed ``digest``:
    ``None`` when its marker names that file and every file is the one the conversion
    wrote (hashed again: about 1.9 s for 1.1 GB), else what is missing or changed."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except OSError:
        return f"no {MARKER}: a conversion cut short, or a folder copied in part"
    except ValueError:
        return f"its {MARKER} is not valid JSON"
    if not isinstance(marker, dict) or marker.get("sha256") != digest:
        return f"its {MARKER} names another file"
    recorded = marker.get(CONTENTS)
    if not isinstance(recorded, dict):
        return "written by an older icl-lens, without hashes of its files"
    present = {p.name for p in folder.iterdir()} - {MARKER}
    if missing := sorted(set(recorded) - present):
        return f"{', '.join(missing)} missing"
    if added := sorted(present - set(recorded)):
        return f"{', '.join(added)} not written by the conversion"
    changed = [name for name in sorted(recorded) if _sha256([folder / name]) != recorded[name]]
    if changed:
        return f"{', '.join(changed)} changed since the conversion wrote it"
    return None


def _remove_abandoned(root: Path, key: str) -> None:
    """Delete partial conversions of ``key`` whose process is gone."""
    for partial in root.glob(f".partial-{key}-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _require_reader(why: str = "") -> None:
    """``ImportError`` naming the pip command when the GGUF reader is missing; ``why``
    (ending in ", and ") says why a conversion is needed when it is not the first."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{why}converting a GGUF checkpoint needs {' and '.join(missing)} (transformers' "
            f"GGUF reader): {PIP_HINT}"
        )


def _convert(files: Sequence[Path], out: Path, *, progress: bool) -> None:
    """Dequantise ``files`` (chunks concatenated in order) to float32 and save the model
    and its tokenizer as a Hugging Face directory ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    if len(files) == 1:
        folder, name = files[0].parent, files[0].name
    else:
        folder, name = out, "joined.gguf"
        with (out / name).open("wb") as joined:
            for path in files:
                with path.open("rb") as chunk:
                    shutil.copyfileobj(chunk, joined, 1 << 22)
    kwargs = {"gguf_file": name, "dtype": torch.float32, **_dequantize_kwargs()}
    if progress:
        print(f"icl-lens: converting {files[0]} (once; cached in {out.parent})", file=sys.stderr)
    shown = str(files[0]) if len(files) == 1 else f"the {len(files)} chunks {_span(files)} joined"
    check_layout(folder / name, shown)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ValueError as err:
        raise ValueError(f"transformers cannot read {shown}: {err}") from err
    _refuse_non_finite(model, shown)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; drop the GGUF bookkeeping
        quantizer.remove_quantization_config(model)
    if len(files) > 1:
        (out / name).unlink()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _span(files: Sequence[Path]) -> str:
    return f"{files[0].name}..{files[-1].name}"


def _refuse_non_finite(model, shown: str) -> None:
    """A weight decoded to NaN or inf means scrambled or damaged bytes (random bytes read
    as quantisation scales), not a model: refuse it rather than cache it (about 0.3 s
    for Gemma 3 270M; ``isfinite(w).all()`` takes 5 s)."""
    for name, weight in model.named_parameters():  # min and max are NaN if one value is
        if weight.numel() and not torch.isfinite(torch.stack(torch.aminmax(weight))).all():
            raise ValueError(
                f"the weights decoded from {shown} are not finite ({name} holds NaN or inf): "
                f"the file is damaged or its chunks are out of order; {EACH_ONCE}, or "
                "download it again"
            )


def _dequantize_kwargs() -> dict:
    """transformers >= 5 can keep GGUF blocks packed; TransformerLens needs dense weights."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
