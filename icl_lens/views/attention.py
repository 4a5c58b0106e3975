"""The query's attention under ZSL, ICL and FT, side by side (circuitsvis
``AttentionHeads``: one named thumbnail per setting and head).

>>> from tests.models import make_model, make_tokenizer
>>> import icl_lens as il
>>> model, _ = make_model("gpt2")
>>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3 w4", separator=" \\n")
>>> cmp = attention_comparison(model, p, layer=1, heads=[0, 2])
>>> sorted(cmp.patterns), len(cmp.tokens), len(cmp.patterns["icl"][0])
(['icl', 'zsl'], 3, 3)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from icl_lens.hooks.capture import Capture
from icl_lens.model.adapter import adapt
from icl_lens.views.meta_gradients import prompt_tokens
from icl_lens.views.page import SETTING_NAMES, Component, Panel, View, display_tokens, plain, render

__all__ = ["AttentionComparison", "attention_comparison", "query_attention"]


def query_attention(
    model, tokens: Tensor, *, layers: Sequence[int]
) -> Float[Tensor, "layer head pos pos"]:
    """Softmax attention patterns of ``tokens`` (one sequence, used as given) at
    ``layers``, from ``hook_pattern``."""
    adapter = adapt(model)
    capture = Capture(adapter, what={"pattern"}, layers=list(layers))
    with adapter.inference():
        capture.run(tokens[None].to(adapter.device))
    return torch.stack([capture.values["pattern", la][0] for la in layers]).float().cpu()


@dataclass
class AttentionComparison:
    """The query's attention over BOS and its own tokens, per setting and head.

    ``patterns[setting]`` is ``[head, dest, src]`` over ``tokens`` (BOS + query). For
    ICL the rows are the ICL prompt's query rows restricted to these columns: they sum
    to ``1 - demo_mass`` (the rest went to demonstrations, listed in ``demo_mass``).
    """

    layer: int
    heads: list[int]
    tokens: list[str]
    patterns: dict[str, list]
    demo_mass: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return plain(
            {
                "layer": self.layer,
                "heads": self.heads,
                "tokens": self.tokens,
                "patterns": self.patterns,
                "demo_mass": self.demo_mass,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionComparison:
        return cls(
            layer=int(data["layer"]),
            heads=[int(h) for h in data["heads"]],
            tokens=[str(t) for t in data["tokens"]],
            patterns={str(k): v for k, v in data["patterns"].items()},
            demo_mass=[float("nan") if x is None else float(x) for x in data.get("demo_mass", [])],
        )

    def view(self) -> View:
        names, stacked = [], []
        for i, head in enumerate(self.heads):
            for setting, pattern in self.patterns.items():
                names.append(f"{SETTING_NAMES.get(setting, setting.upper())} L{self.layer}H{head}")
                stacked.append(pattern[i])
        settings = [SETTING_NAMES.get(s, s.upper()) for s in self.patterns]
        heading = render(
            "attention.html.j2",
            layer=self.layer,
            settings=settings,
            masses=list(zip(self.heads, self.demo_mass, strict=False)),
        )
        component = Component(
            "AttentionHeads",
            {
                "attention": stacked,
                # AttentionHeads draws tokens on a canvas (chart axes), never as HTML:
                # they go in as plain text (the browser test checks both).
                "tokens": display_tokens(self.tokens),
                "attentionHeadNames": names,
                "maskUpperTri": True,
            },
        )
        return View(Panel(heading, component), title=f"icl-lens: attention at layer {self.layer}")


def attention_comparison(
    model,
    prompt,
    *,
    layer: int,
    heads: Sequence[int] | None = None,
    ft_model=None,
) -> AttentionComparison:
    """The query's attention under ZSL (``model`` on BOS + query), ICL (``model`` on the
    whole prompt) and, with ``ft_model``, FT (the finetuned model on BOS + query).
    ``.view()`` draws them side by side."""
    side = torch.cat([prompt.tokens[:1], prompt.tokens[prompt.query_start :]])
    side_idx = [0, *range(prompt.query_start, prompt.n_tokens)]
    adapter = adapt(model)
    n_heads = adapter.n_heads
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise IndexError(f"heads {bad} out of range: the model has {n_heads} heads")
    icl = query_attention(adapter, prompt.tokens, layers=[layer])[0]  # head pos pos
    idx = torch.tensor(side_idx)
    icl_side = icl[heads][:, idx][:, :, idx]
    demo_mass = icl[heads, -1][:, prompt.demo_mask].sum(-1)
    patterns = {"zsl": query_attention(adapter, side, layers=[layer])[0][heads]}
    patterns["icl"] = icl_side
    if ft_model is not None:
        patterns["ft"] = query_attention(ft_model, side, layers=[layer])[0][heads]
    tokens = prompt_tokens(prompt)
    return AttentionComparison(
        layer=int(layer),
        heads=heads,
        tokens=[tokens[i] for i in side_idx],
        patterns={k: v.tolist() for k, v in patterns.items()},
        demo_mass=[float(x) for x in demo_mass],
    )
