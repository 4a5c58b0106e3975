"""Load a model as a TransformerLens hooked model, on whichever line is installed.

Four sources: a hub name (needs network), a local Hugging Face directory, a GGUF
checkpoint (a ``.gguf`` file, a folder holding one, or a list of chunks; converted once and
cached by :mod:`icl_lens.model.gguf`), or an in-memory transformers model with its
tokenizer. Weights are loaded without TransformerLens's weight processing, so hook values
equal the transformers model's: in particular value biases stay in ``v`` (not folded into
``b_O``), which the duality decomposition reads.

Placement beyond one device is passed through, not reimplemented: ``device_map``,
``n_devices`` and ``max_memory`` go to ``TransformerBridge.boot_transformers`` for a hub
name and to ``from_pretrained`` for a local directory (accelerate places the layers);
TransformerLens 3.x takes ``n_devices`` only. ``dtype`` may be a name ("bfloat16").

>>> import icl_lens as il
>>> model = il.load_model(il.toy_model_dir())          # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch

from icl_lens.model.adapter import adapt
from icl_lens.model.gguf import converted_dir, gguf_files
from icl_lens.model.validation import (
    check_causal_decoder,
    check_local_source,
    check_safetensors_files,
    check_tokenizer_files,
    check_tokenizer_fits,
)

LineChoice = Literal["auto", "bridge", "hooked"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model can be loaded in, by name (``--dtype``)."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"`` (or a dtype as it is).

    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _placement(line: str, device_map, n_devices, max_memory) -> dict:
    """The placement arguments for ``from_pretrained`` / ``boot_transformers`` (empty for
    one device); ``n_devices`` becomes a balanced ``device_map`` with memory budgets as
    the bridge does it."""
    if device_map is None and n_devices is None and max_memory is None:
        return {}
    if line == "hooked":
        if device_map is not None or max_memory is not None:
            raise ValueError(
                "device_map and max_memory need TransformerLens 4 (TransformerBridge); "
                "on TransformerLens 3.x split a model with n_devices"
            )
        return {}
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    device_map, max_memory = resolve_device_map(n_devices, device_map, None, max_memory)
    out = {"device_map": device_map} if device_map is not None else {}
    return out | ({"max_memory": max_memory} if max_memory is not None else {})


def installed_line() -> Literal["bridge", "hooked"]:
    """``"bridge"`` with TransformerLens 4.x, ``"hooked"`` with 3.x."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError:
        return "hooked"
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return "bridge"
    return "hooked"


def _prepare_tokenizer(tokenizer, name: str):
    """TransformerLens re-downloads a tokenizer unless it knows its name and that it
    adds BOS; icl-lens builds its own token sequences, so declaring both is safe."""
    tokenizer.init_kwargs.setdefault("name_or_path", name)
    tokenizer.init_kwargs["add_bos_token"] = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checked_source(source, tokenizer):
    """``(source, tokenizer)`` after refusing a local path that does not exist (never
    sent to the hub) and a tokenizer for a hub model; a directory comes back as a
    ``Path`` (``~`` expanded), a tokenizer given by name or directory loaded."""
    if isinstance(source, str | Path):
        check_local_source(source)
        if Path(source).expanduser().is_dir():
            source = Path(source).expanduser()
        elif tokenizer is not None and not Path(source).expanduser().exists():
            raise ValueError(
                f"{str(source)!r} is loaded from the hub with its own tokenizer; tokenizer= "
                "applies to a local directory or an in-memory model"
            )
    if isinstance(tokenizer, str | Path):
        tokenizer = _tokenizer_from(tokenizer)
    return source, tokenizer


def _tokenizer_from(name_or_dir: str | Path):
    """A tokenizer given by hub name or directory (``--tokenizer``)."""
    from transformers import AutoTokenizer

    check_local_source(name_or_dir)
    if Path(name_or_dir).expanduser().is_dir():
        name_or_dir = Path(name_or_dir).expanduser()
        check_tokenizer_files(name_or_dir)
    return AutoTokenizer.from_pretrained(name_or_dir, add_bos_token=True)


def _check_model_directory(directory: Path, *, need_tokenizer: bool) -> None:
    """Refuse, before loading any weights, a directory that is not a causal decoder,
    whose weight files are damaged, or that has no tokenizer when none was given."""
    from transformers import AutoConfig

    check_causal_decoder(AutoConfig.from_pretrained(directory), where=str(directory))
    check_safetensors_files(directory)
    if need_tokenizer:
        check_tokenizer_files(directory)


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def _gemma3_hooked_config(config) -> dict:
    """TransformerLens 3's HookedTransformer runs Gemma 3 text models (local and global
    layers, dual rotary bases, QK-norm, norms before and after each sublayer) but builds
    their config only from its table of hub names; this is the same config, read from
    the transformers config instead."""
    rope = config.rope_parameters
    types = list(config.layer_types)
    return {
        "d_model": config.hidden_size,
        "d_head": config.head_dim,
        "n_heads": config.num_attention_heads,
        "n_key_value_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size,
        "n_layers": config.num_hidden_layers,
        "n_ctx": config.max_position_embeddings,
        "eps": config.rms_norm_eps,
        "d_vocab": config.vocab_size,
        "act_fn": config.hidden_activation,
        "initializer_range": config.initializer_range,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_base": rope["full_attention"]["rope_theta"],
        "rotary_base_local": rope["sliding_attention"]["rope_theta"],
        "use_attn_scale": True,
        "attn_scale": float(config.query_pre_attn_scalar) ** 0.5,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "use_qk_norm": True,
        "use_local_attn": "sliding_attention" in types,
        "window_size": config.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in types],
        "original_architecture": "Gemma3ForCausalLM",
    }


def _hooked_from_hf(hf_model, tokenizer, device, dtype, n_devices=1):
    """TransformerLens 3.x: convert an in-memory transformers model offline."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = hf_model.config.to_dict()
    config["architectures"] = config.get("architectures") or [type(hf_model).__name__]
    if "n_positions" in config:  # TL 3 reads GPT-2's old n_ctx name
        config.setdefault("n_ctx", config["n_positions"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        if config["architectures"] == ["Gemma3ForCausalLM"]:
            cfg_dict = _gemma3_hooked_config(hf_model.config)
        else:
            try:
                cfg_dict = loading.convert_hf_model_config(tmp)
            except NotImplementedError as err:
                raise ValueError(
                    f"TransformerLens {_tl_version()} (HookedTransformer) cannot convert "
                    f"{config['architectures'][0]} from a local or in-memory model ({err}); "
                    "TransformerLens 4 can: pip install 'transformer-lens>=4'"
                ) from err
        fields = HookedTransformerConfig.__dataclass_fields__
        cfg = HookedTransformerConfig(
            **{k: v for k, v in cfg_dict.items() if k in fields},
            device=device,
            dtype=dtype,
            n_devices=n_devices,
        )
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model=hf_model)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    if n_devices > 1:
        model.move_model_modules_to_device()
        return model
    return model.to(device)


def load_model(
    source,
    tokenizer=None,
    *,
    line: LineChoice = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
):
    """A TransformerLens hooked model from a hub name, a local directory, a GGUF
    checkpoint or a transformers model, in eval mode.

    ``line="auto"`` uses TransformerBridge on TransformerLens 4.x and HookedTransformer
    on 3.x. ``tokenizer`` (a tokenizer, or a hub name / directory to load one from)
    replaces the directory's own.

    Refused early, with what to do (:mod:`icl_lens.model.validation`): a path that does
    not exist (never sent to the hub), a model that is not a causal decoder (BERT), a
    damaged ``*.safetensors`` file, a directory without a tokenizer, and a tokenizer
    whose size does not fit the model's embedding table.

    A GGUF source (a ``.gguf`` file, a folder holding one, or a list of chunk files,
    joined in the order their numbered names say) is checked to be one well-formed GGUF,
    dequantised once to float32 and cached as a Hugging Face directory (see
    :mod:`icl_lens.model.gguf`; a damaged cache entry is converted again), which is then
    checked and loaded like any other; ``dtype`` applies when that directory is loaded.

    ``device`` (default cpu) or, to spread the layers over several devices,
    ``device_map`` ("auto", "balanced" or a module -> device dict), ``n_devices`` (CUDA
    devices, balanced) and ``max_memory`` (per-device budgets). An in-memory model keeps
    the placement it has (load it with ``from_pretrained(..., device_map=...)``).

    >>> model = load_model("gpt2")                           # doctest: +SKIP
    >>> model = load_model("path/to/checkpoint_dir")         # doctest: +SKIP
    >>> model = load_model("path/to/model.gguf")             # doctest: +SKIP
    >>> model = load_model(hf_model, tokenizer=hf_tokenizer) # doctest: +SKIP
    >>> model = load_model("google/gemma-3-1b-pt", device_map="auto",
    ...                    dtype="bfloat16")                 # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    line = installed_line() if line == "auto" else line
    if gguf_files(source) is not None:
        source = converted_dir(source)
    source, tokenizer = _checked_source(source, tokenizer)
    dtype = resolve_dtype(dtype)
    placement = _placement(line, device_map, n_devices, max_memory)
    if placement and device is not None:
        raise ValueError("pass either device or device_map / n_devices / max_memory, not both")
    split = (n_devices or 1) > 1  # TransformerLens 3 splits over cuda:0..n-1 itself
    device = None if placement else (device or ("cuda" if split else "cpu"))
    if isinstance(source, str | Path) and not Path(source).is_dir():
        name = str(source)
        if line == "bridge":
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(
                name, device=device, dtype=dtype, **placement
            )
        else:
            from transformer_lens import HookedTransformer

            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=dtype, n_devices=n_devices or 1
            )
        model.eval()
        adapt(model)
        return model

    if isinstance(source, str | Path):
        directory = Path(source)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(
                f"{directory} has no config.json: pass a Hugging Face model directory "
                "(save_pretrained output) or a hub name"
            )
        _check_model_directory(directory, need_tokenizer=tokenizer is None)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **placement)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(directory, add_bos_token=True)
        name = str(directory)
    else:
        hf_model = source
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: load_model(m, tokenizer=tok)")
        name = getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        check_causal_decoder(hf_model.config, architecture=type(hf_model).__name__)
        if placement:
            raise ValueError(
                "an in-memory model keeps its own placement: load it with "
                "from_pretrained(..., device_map=...) and pass it, or pass a directory"
            )
    check_tokenizer_fits(tokenizer, hf_model, where=name)
    tokenizer = _prepare_tokenizer(tokenizer, name)
    if getattr(hf_model, "hf_device_map", None):  # placed by accelerate: keep it there
        device = None
        hf_model = hf_model.eval()
    else:
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if not hf_model.config.architectures:  # a model built from a config names none
        hf_model.config.architectures = [type(hf_model).__name__]
    if line == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        # a name that is not a hub alias: the bridge maps aliases like "neox" to hub ids
        model = TransformerBridge.boot_transformers(
            f"local/{Path(name).name or 'model'}", hf_model=hf_model, tokenizer=tokenizer
        )
    else:
        model = _hooked_from_hf(hf_model, tokenizer, device, dtype, n_devices or 1)
    model.eval()
    adapt(model)
    return model
