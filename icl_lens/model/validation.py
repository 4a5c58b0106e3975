"""Checks that refuse a model source before it can give silently wrong results.

:func:`~icl_lens.model.loading.load_model` calls these; each raises a builtin error
(``FileNotFoundError``, ``ValueError``) whose message names the problem and the fix, so
the CLI can print it as one line.

>>> looks_like_path("./models/gpt2-tiny"), looks_like_path("EleutherAI/pythia-70m")
(True, False)
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
"""A name ending in one of these is a file path, never a hub model id."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a saved tokenizer has at least one."""


def looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a local path, not a hub id (``org/name``):
    it starts with ``./``, ``../``, ``/`` or ``~``, has more than one ``/`` (or a
    backslash on Windows), or ends in a model file extension."""
    text = str(name)
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", ".."):
        return True
    if text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    if text.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    first = text.split("/")[0]
    return "/" in text and Path(first).is_dir()  # "models/gpt2-tinyy" under ./models


def check_local_source(source: str | os.PathLike) -> None:
    """Refuse a string that names a local path that is not a model directory, instead
    of letting it reach the hub ("couldn't connect", "repo id must use ...").

    >>> check_local_source("./no/such/model")
    Traceback (most recent call last):
    ...
    FileNotFoundError: no such directory: './no/such/model'
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return  # a single-file model format with its own loader
        raise FileNotFoundError(
            f"{str(source)!r} is a file; pass the directory that holds config.json and the "
            "weights (the folder save_pretrained wrote)"
        )
    if not looks_like_path(str(source)):
        return
    message = f"no such directory: {str(source)!r}"
    parent = path.parent
    if parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        if near:
            message += f"; did you mean {str(parent / near[0])!r}?"
    raise FileNotFoundError(message)


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """Refuse a model directory that has no saved tokenizer (transformers would load an
    empty one without complaint)."""
    directory = Path(directory)
    if not _has_tokenizer_files(directory):
        raise FileNotFoundError(
            f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...): "
            "save it there with tokenizer.save_pretrained(DIR), or pass one: "
            "load_model(DIR, tokenizer=AutoTokenizer.from_pretrained(...)) in Python, "
            "--tokenizer NAME_OR_DIR on the command line"
        )


def check_safetensors_files(directory: str | os.PathLike) -> None:
    """Read the header of every ``*.safetensors`` file in ``directory``: an empty,
    truncated or corrupt file is refused naming the file (reading a header is cheap; a
    truncated body is caught too, as the header no longer covers the file)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - SafetensorError is not exported stably
            reason = str(err).removeprefix("Error while deserializing header: ")
            raise ValueError(
                f"{path} is not a readable safetensors file ({reason}; {path.stat().st_size} "
                "bytes): the download or save was cut short; save or download the model again"
            ) from None


def _causal_lm_model_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _encoder_model_types() -> set[str]:
    """Model families whose causal-LM class is an encoder run as a decoder only when its
    config says ``is_decoder`` (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def check_causal_decoder(config, *, architecture: str | None = None, where: str = "") -> None:
    """Refuse a transformers config that is not a causal (decoder-only) language model:
    an encoder such as BERT attends both ways, so "in-context learning" and the
    prediction position mean nothing there, yet it loads and runs to the end.

    ``architecture`` names the in-memory model's class when there is one.
    """
    model_type = getattr(config, "model_type", None) or "unknown"
    names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    shown = ", ".join(names) or model_type
    subject = f"{where} holds" if where else "this is"
    causal = _causal_lm_model_types()
    decoder_only = (
        "icl-lens needs a causal decoder-only language model (GPT-2, GPT-NeoX/Pythia, "
        "Llama, Gemma, ...)"
    )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{subject} an encoder-decoder model ({shown}); {decoder_only}")
    if model_type not in causal:
        raise ValueError(
            f"{subject} a {model_type!r} model ({shown}), which is not a causal language "
            f"model; {decoder_only}"
        )
    if model_type in _encoder_model_types() and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"{subject} an encoder ({shown}: bidirectional attention, is_decoder=False); "
            f"{decoder_only}"
        )
    heads = set(causal.values())
    bad = [n for n in names if n not in heads and not n.endswith("Model")]
    if bad and len(bad) == len(names):
        raise ValueError(
            f"{subject} a {', '.join(bad)}, not a causal language model head; {decoder_only}"
        )


def check_tokenizer_fits(tokenizer, hf_model, *, where: str = "") -> None:
    """Refuse a tokenizer that cannot belong to ``hf_model``: an empty one, one with more
    tokens than the model has embeddings (its ids would index past the table), or one
    with fewer than half as many (embedding tables are padded a little, never doubled).
    """
    n_tokens = len(tokenizer)
    n_embeddings = int(hf_model.get_input_embeddings().num_embeddings)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    about = f" ({where})" if where else ""
    if n_tokens <= 1:
        raise ValueError(
            f"the tokenizer{about} is empty ({n_tokens} token): the model directory has no "
            "tokenizer; pass one with load_model(..., tokenizer=...) or --tokenizer"
        )
    if n_tokens > n_embeddings or 2 * n_tokens < n_embeddings:
        raise ValueError(
            f"the tokenizer {name!r}{about} has {n_tokens} tokens but the model has "
            f"{n_embeddings} token embeddings: it is another model's tokenizer; pass the "
            "tokenizer the model was trained with"
        )
