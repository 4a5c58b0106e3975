"""From-definition references the tests check icl-lens against: built from a model's
weights and the architecture's published definitions, never from icl-lens's code."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rotary(x, positions, rot_dim, base):
    """Rotate-half rotary embedding from its definition (not the model's code)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    return torch.cat([x_rot * cos[:, None] + rotated * sin[:, None], x_pass], -1)


def gemma_rms(x, weight, eps):
    """Gemma's RMSNorm from its definition: x / rms(x) * (1 + w)."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * (1.0 + weight.detach())


def gemma3_reference(hf, tokens, demo_mask, positions: Sequence[int]):
    """(zsl, icl, z), each ``[layer, head, n_pos, d_head]``, of a transformers Gemma 3 at
    ``positions``, from its weights and Gemma 3's definitions alone: RMSNorm with 1 + w,
    QK-norm, rotary with the layer type's base, one key/value head shared by the query
    heads of its group, keys j visible when j <= position and, on a sliding layer,
    position - j < window; softmax scaled by 1/sqrt(query_pre_attn_scalar). Only the
    residual stream entering each layer comes from the transformers forward."""
    cfg = hf.config
    with torch.no_grad():
        hidden = hf(tokens[None], output_hidden_states=True).hidden_states
    pos = torch.arange(len(tokens))
    at = torch.tensor(list(positions))
    d, eps = cfg.head_dim, cfg.rms_norm_eps
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {"zsl": [], "icl": [], "z": []}
    for layer, layer_type in enumerate(cfg.layer_types):
        block = hf.model.layers[layer]
        attn = block.self_attn
        x = gemma_rms(hidden[layer][0].float(), block.input_layernorm.weight, eps)

        def heads(proj, n, x=x):
            return (x @ proj.weight.detach().T).view(-1, n, d)

        q = gemma_rms(heads(attn.q_proj, cfg.num_attention_heads), attn.q_norm.weight, eps)
        k = gemma_rms(heads(attn.k_proj, cfg.num_key_value_heads), attn.k_norm.weight, eps)
        v = heads(attn.v_proj, cfg.num_key_value_heads)
        base = cfg.rope_parameters[layer_type]["rope_theta"]
        q, k = rotary(q[at], at, d, base), rotary(k, pos, d, base)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        seen = pos[None, :] <= at[:, None]  # n_pos pos
        if layer_type == "sliding_attention":
            seen &= at[:, None] - pos[None, :] < cfg.sliding_window
        kq = torch.einsum("nhd,phd->hnp", q, k) * seen
        out["icl"].append(torch.einsum("hnp,phd->hnd", kq * demo_mask, v))
        out["zsl"].append(torch.einsum("hnp,phd->hnd", kq * ~demo_mask, v))
        scores = (kq * cfg.query_pre_attn_scalar**-0.5).masked_fill(~seen, float("-inf"))
        out["z"].append(torch.einsum("hnp,phd->hnd", scores.softmax(-1), v))
    return tuple(torch.stack(out[key]) for key in ("zsl", "icl", "z"))
