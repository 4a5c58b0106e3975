"""The meta-gradients of one head, token by token, as a circuitsvis view.

:func:`meta_gradients` reads one head's per-token terms ``v_j (k_j . q)`` from a
:class:`~icl_lens.study.duality.Decomposition`: their direct effect on the label logit
difference (when label tokens were given), their signed projection on the head's real
output, their norm, the attention weight. Demonstration tokens carry ``dW_ICL q``, BOS
and the query carry ``W_ZSL q``. :func:`meta_gradient_view` colours the prompt by them
(circuitsvis ``ColoredTokensMulti``); :func:`top_heads` / :func:`meta_gradient_views`
pick the heads with the largest ``|dW_ICL q|``.

circuitsvis inserts token strings as HTML (``innerHTML``), so tokens are HTML-escaped
before they become props (:func:`token_props`); everything else shown is escaped by the
template.

>>> import icl_lens as il
>>> model = il.toy_model()                                            # doctest: +SKIP
>>> dec = il.decompose(model, il.icl_prompt(model, shots=8))          # doctest: +SKIP
>>> meta_gradient_views(dec, k=3).save("heads.html")                  # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from icl_lens.views.page import Component, Panel, View, display_tokens, plain, render

__all__ = [
    "MetaGradients",
    "meta_gradient_view",
    "meta_gradient_views",
    "meta_gradients",
    "token_props",
    "top_heads",
]


def token_props(tokens: Sequence[str]) -> list[str]:
    """circuitsvis's ColoredTokens / ColoredTokensMulti insert token strings as HTML
    (``innerHTML``): escape ``&``, ``<`` and ``>`` so a token shows as text and can
    never become markup. (Their hover tooltip shows such a token's entities; plain words
    are unaffected.)"""
    return [html.escape(t, quote=False) for t in tokens]


def prompt_tokens(prompt) -> list[str]:
    if prompt.str_tokens:
        return list(prompt.str_tokens)
    return [str(int(t)) for t in prompt.tokens]


KINDS = ("icl", "transplant")


def _floats(values: Iterable[Any]) -> list[float]:
    return [float("nan") if x is None else float(x) for x in values]


@dataclass
class MetaGradients:
    """One head's per-token terms at one query position, ready to draw or store.

    ``values[name]`` has one number per token of ``tokens`` (the prompt up to and
    including the query position); ``is_demo`` marks demonstration tokens (their terms
    sum to ``dW_ICL q``; the others to ``W_ZSL q``).
    """

    layer: int
    head: int
    position: int
    tokens: list[str]
    is_demo: list[bool]
    values: dict[str, list[float]]
    stats: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, str] | None = None
    kind: str = "icl"
    """``"icl"``: the terms of the ICL forward (every token's); ``"transplant"``: what
    Transplant({h}, linear) adds, q from the Blind forward (the demonstrations' terms)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def head_label(self) -> str:
        return f"L{self.layer}H{self.head}"

    def to_dict(self) -> dict[str, Any]:
        return plain(
            {
                "layer": self.layer,
                "head": self.head,
                "position": self.position,
                "tokens": self.tokens,
                "is_demo": self.is_demo,
                "values": self.values,
                "stats": self.stats,
                "labels": list(self.labels) if self.labels else None,
                "kind": self.kind,
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetaGradients:
        labels = data.get("labels")
        return cls(
            layer=int(data["layer"]),
            head=int(data["head"]),
            position=int(data["position"]),
            tokens=[str(t) for t in data["tokens"]],
            is_demo=[bool(x) for x in data["is_demo"]],
            values={str(k): _floats(v) for k, v in data["values"].items()},
            stats={str(k): _floats([v])[0] for k, v in data.get("stats", {}).items()},
            labels=None if not labels else (str(labels[0]), str(labels[1])),
            kind=str(data.get("kind", "icl")),
        )

    def top_tokens(self, k: int = 8, by: str | None = None) -> pd.DataFrame:
        """The ``k`` demonstration tokens with the largest ``|values[by]|``."""
        by = by or next(iter(self.values))
        frame = pd.DataFrame({"position": range(len(self.tokens)), "token": self.tokens})
        for name, v in self.values.items():
            frame[name] = v
        frame = frame[np.array(self.is_demo, dtype=bool)]
        order = frame[by].abs().sort_values(ascending=False).index[:k]
        return frame.loc[order].reset_index(drop=True)

    def view(self) -> View:
        first = next(iter(self.values))
        sign = "blue: positive, red: negative"
        if first.startswith("push toward") and self.labels:
            sign = f"blue: toward {self.labels[1]}, red: toward {self.labels[0]}"
        elif first == "label effect":
            sign = "blue: toward the second label word, red: toward the first"
        shown = display_tokens(self.tokens)
        top = self.top_tokens(6, by=first)
        context = {
            "mg": self,
            "stats": self.stats,
            "query": "".join(t for t, d in zip(shown, self.is_demo, strict=True) if not d),
            "first": first,
            "sign": sign,
            "top": [
                {"position": int(r.position), "token": _visible(r.token), "value": r[first]}
                for _, r in top.iterrows()
            ],
        }
        colored = Component(
            "ColoredTokensMulti",
            {
                "tokens": token_props(shown),
                "values": [list(row) for row in zip(*self.values.values(), strict=True)],
                "labels": list(self.values),
            },
        )
        return View(
            Panel(
                render("meta_gradients.html.j2", part="head", **context),
                colored,
                render("meta_gradients.html.j2", part="top", **context),
            ),
            title=f"icl-lens: {self.head_label} "
            + ("transplanted update" if self.kind == "transplant" else "meta-gradients"),
        )


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5")


def meta_gradients(
    dec,
    layer: int,
    head: int,
    n: int = 0,
    *,
    labels: tuple[str, str] | None = None,
    transplant: bool = False,
) -> MetaGradients:
    """Per-token terms ``v_j (k_j . q)`` of one head at recorded position ``n``.

    Values per token (up to the position): ``label effect`` (through W_O onto the label
    logit-difference direction; only with ``decompose(..., label_tokens=...)``),
    ``along head output`` (through W_O, signed projection on the head's real output
    ``z W_O``), ``norm`` (of the term through W_O), ``attention`` (softmax weight) and
    ``k.q`` (raw dot product). ``labels=(a, b)`` names the label words for the caption.

    ``transplant=True`` reads ``dec`` as a decomposition under Blind
    (``decompose(..., intervention=blind(adapter))``) and keeps what Transplant({h},
    linear) adds to the head, ``dW_ICL q_t`` with q_t from the Blind forward: the
    demonstration tokens' terms (the query side's are 0), ``along the update`` (signed
    projection on ``dW_ICL q_t W_O`` itself) in place of the head output, and no
    attention (Blind's is zero on the demonstrations).

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> mg = meta_gradients(il.decompose(model, p), layer=1, head=0)
    >>> len(mg.tokens) == p.n_tokens, list(mg.values)[:2]
    (True, ['along head output', 'norm'])
    """
    if labels is not None and (isinstance(labels, str) or len(labels) != 2):
        raise ValueError(
            "labels must name the two label words (a, b) of decompose's label_tokens, e.g. "
            f"('bad', 'good'); got {labels!r}"
        )
    li, head, n = dec.index_of(layer, head, n)  # the model's layer number -> its axis
    pos = dec.recorded_position(n)
    upto = slice(0, pos + 1)
    kq = dec.key_dot_query[li, head, n, upto]
    if transplant:
        kq = kq * dec.demo_mask[upto]
    terms = dec.values[li, head, upto] * kq[:, None]  # pos d_head
    resid = dec.head_to_resid(layer, head, n, terms)  # pos d_model
    along = dec.icl[li, head, n] if transplant else dec.z[li, head, n]
    out = dec.head_to_resid(layer, head, n, along)
    unit = out / out.norm().clamp(min=1e-30)
    values: dict[str, Tensor] = {}
    if dec.label_direction is not None:
        key = "label effect" if labels is None else f"push toward {labels[1]} vs {labels[0]}"
        values[key] = resid @ dec.label_direction[li, n]
    values["along the update" if transplant else "along head output"] = resid @ unit
    values["norm"] = resid.norm(dim=-1)
    if not transplant:
        values["attention"] = dec.pattern[li, head, n, upto]
    values["k.q"] = kq
    zsl_norm = float(dec.zsl[li, head, n].norm())
    icl_norm = float(dec.icl[li, head, n].norm())
    stats = {
        "icl_norm": icl_norm,
        "zsl_norm": zsl_norm,
        "icl_norm_ratio": icl_norm / max(zsl_norm, 1e-30),
        "demo_mass": float(dec.demo_mass[li, head, n]),
        "relax_cos": float(dec.relaxation_cosine[li, head, n]),
    }
    if transplant:
        z_norm = float(dec.z[li, head, n].norm())
        stats = {
            "icl_norm": icl_norm,
            "blind_norm": z_norm,
            "update_ratio": icl_norm / max(z_norm, 1e-30),
        }
    return MetaGradients(
        layer=int(dec.layers[li]),
        head=int(head),
        position=pos,
        tokens=prompt_tokens(dec.prompt)[upto],
        is_demo=[bool(x) for x in dec.demo_mask[upto]],
        values={k: [float(x) for x in v.detach().double()] for k, v in values.items()},
        stats=stats,
        labels=labels,
        kind="transplant" if transplant else "icl",
    )


def meta_gradient_view(
    dec, layer: int, head: int, n: int = 0, *, labels: tuple[str, str] | None = None
) -> View:
    """circuitsvis view of one head: the prompt's tokens (demonstrations, then the query)
    coloured by their term ``v_j (k_j . q)``; see :func:`meta_gradients` for the values.

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> view = il.decompose(model, p).view_meta_gradients(layer=1, head=0)
    >>> [c.name for c in view.components]
    ['ColoredTokensMulti']
    """
    return meta_gradients(dec, layer, head, n, labels=labels).view()


def top_heads(dec, k: int = 4, n: int = 0, *, by: str = "icl_norm") -> list[tuple[int, int]]:
    """``(layer, head)`` of the ``k`` heads with the largest ``by`` (a
    :meth:`Decomposition.to_frame` column, default ``|dW_ICL q|``) at recorded
    position ``n``, as the model's layer numbers."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive int (how many heads to show), got {k!r}")
    position = dec.recorded_position(n)
    frame = dec.to_frame()
    frame = frame[frame["position"] == position]
    numeric = [c for c in frame.columns if c not in ("layer", "head", "head_label", "position")]
    if by not in numeric:
        raise KeyError(f"unknown column {by!r}; choose from {numeric}")
    best = frame.assign(_key=frame[by].abs()).sort_values("_key", ascending=False).head(k)
    return [(int(r.layer), int(r.head)) for r in best.itertuples()]


def meta_gradient_views(
    dec,
    heads: Iterable[tuple[int, int]] | None = None,
    *,
    k: int = 4,
    n: int = 0,
    labels: tuple[str, str] | None = None,
) -> View:
    """The meta-gradient views of ``heads`` (default: :func:`top_heads`) in one panel,
    with the circuitsvis bundle inlined once."""
    heads = top_heads(dec, k, n) if heads is None else list(heads)
    odd = [h for h in heads if isinstance(h, str) or not hasattr(h, "__len__") or len(h) != 2]
    if odd or not heads:
        raise ValueError(
            "heads must be a non-empty list of (layer, head) pairs, e.g. heads=[(1, 0)], "
            f"or None for the top k; got {heads!r}"
        )
    views = [meta_gradient_view(dec, la, h, n, labels=labels) for la, h in heads]
    return View(top_heads_heading(f"L{la}H{h}" for la, h in heads), *views)


def top_heads_heading(names: Iterable[str]) -> Any:
    return render("heading.html.j2", text=f"Top heads by |dW_ICL q|: {', '.join(names)}")
