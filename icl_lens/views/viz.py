"""Views of the meta-gradients that render in a notebook and save as offline HTML.

Every view is a :class:`View`: it displays itself in Jupyter and ``view.save(path)``
writes one self-contained page. Both use circuitsvis's *local* rendering
(``RenderedHTML.local_src``: its JavaScript bundle inlined, no CDN, no network probe),
so they open with networking off.

- :func:`meta_gradient_view`: for one head, every token up to the query position
  coloured by its term ``v_j (k_j . q)``: its direct effect on the label logit
  difference (when label tokens were given), its signed projection on the head's real
  output, its norm, its attention weight. Demonstration tokens carry ``dW_ICL q``, BOS
  and the query carry ``W_ZSL q``; the query stays in view at the end.
- :func:`top_heads` / :func:`meta_gradient_views`: the heads with the largest
  ``|dW_ICL q|`` and their views in one panel.
- :func:`attention_comparison`: the query's attention over its own tokens under ZSL,
  ICL and FT side by side (circuitsvis ``attention_heads``, one named thumbnail per
  setting and head).
- :func:`overview_view`: layer x head heatmaps (inline SVG) of the attention mass on
  demonstrations, the relaxation gap, ``|dW_ICL q| / |W_ZSL q|``, and per-head or
  per-layer SimAM / SimAOU from a metrics frame.

Safety: token strings, labels and every other dataset-derived text are escaped. The
circuitsvis components insert token strings as HTML (``innerHTML``), so tokens are
HTML-escaped before they become props; props are JSON with ``<``, ``>`` and ``&``
written as ``\\u003c`` etc., so a ``</script>`` in a dataset string cannot end the
script.

>>> import icl_lens as il
>>> from icl_lens.views import viz
>>> model = il.toy_model()                                            # doctest: +SKIP
>>> dec = il.decompose(model, il.icl_prompt(model, shots=8))          # doctest: +SKIP
>>> viz.meta_gradient_views(dec, k=3).save("heads.html")              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor

from icl_lens.files import OutputPathError, atomic_write_text

__all__ = [
    "AttentionComparison",
    "Component",
    "Markup",
    "MetaGradients",
    "OutputPathError",
    "View",
    "attention_comparison",
    "atomic_write_text",
    "display_tokens",
    "head_summary",
    "heatmap_svg",
    "meta_gradient_view",
    "meta_gradient_views",
    "meta_gradients",
    "overview_view",
    "query_attention",
    "safe_json",
    "top_heads",
]

SETTING_NAMES = {"zsl": "ZSL", "icl": "ICL", "ft": "FT"}

# ---------------------------------------------------------------------------------------
# Escaping, the circuitsvis bundle, atomic writes
# ---------------------------------------------------------------------------------------


class Markup(str):
    """HTML this module built itself (everything dataset-derived inside escaped).

    A plain ``str`` given to :class:`View` is text and gets escaped; only ``Markup`` is
    inserted as HTML."""


def esc(text: Any) -> str:
    """``html.escape`` of ``str(text)`` (quotes included)."""
    return html.escape(str(text), quote=True)


_JS_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _plain(obj: Any) -> Any:
    """Tensors and arrays to lists, non-finite floats to None (JSON null)."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def safe_json(obj: Any) -> str:
    """JSON that is safe inside an HTML ``<script>``: ``<``, ``>``, ``&``, U+2028 and
    U+2029 are written as ``\\u`` escapes (same value once parsed).

    >>> safe_json({"t": "</script><b>&"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(_plain(obj), allow_nan=False, ensure_ascii=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JS_UNSAFE[m.group()], text)


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (the JavaScript ``local_src`` inlines), with every
    ``</script`` written as ``<\\/script`` so it cannot end the surrounding tag."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis's JavaScript bundle is missing ({path}); reinstall circuitsvis"
        )
    js = path.read_text(encoding="utf-8")
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A circuitsvis React component (e.g. ``"ColoredTokensMulti"``) and its props."""

    name: str
    props: Mapping[str, Any]


PAGE_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1a202c;
background:#fff;max-width:1200px}
.icl-lens-view h3{margin:18px 0 6px}.icl-lens-view h4{margin:12px 0 4px}
.icl-lens-view .note{color:#4a5568;font-size:13px;margin:4px 0}
.icl-lens-view table.data{border-collapse:collapse;font-size:13px;margin:6px 0}
.icl-lens-view table.data td,.icl-lens-view table.data th{border:1px solid #cbd5e0;
padding:3px 8px;text-align:right}
.icl-lens-view table.data th{background:#edf2f7}
.icl-lens-view table.data td.text{text-align:left;font-family:monospace;white-space:pre-wrap}
.icl-lens-view .panel{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;margin:12px 0}
.icl-lens-view .heatmaps{display:flex;flex-wrap:wrap;gap:18px}
.icl-lens-view .query{font-family:monospace;background:#fefcbf;padding:1px 4px;white-space:pre-wrap}
"""


class View(RenderedHTML):
    """HTML parts and circuitsvis components that display in a notebook and save as
    one self-contained page.

    Parts: :class:`Markup` (trusted HTML), :class:`Component`, another ``View``, or a
    plain ``str`` (escaped, shown as text). ``local_src`` inlines circuitsvis's
    JavaScript once per view; ``cdn_src`` is the same (never a CDN); displaying it never
    probes the network. Views add up: ``view_a + view_b``.

    >>> v = View(Markup("<h3>title</h3>"), "<b>not bold</b>")
    >>> "&lt;b&gt;not bold&lt;/b&gt;" in v.local_src
    True
    """

    def __init__(self, *parts: Any, title: str = "icl-lens"):
        flat: list[Any] = []
        for part in parts:
            if isinstance(part, View):
                flat.extend(part.parts)
            elif isinstance(part, (Markup, Component)):
                flat.append(part)
            elif isinstance(part, str):
                flat.append(Markup(f"<p>{esc(part)}</p>"))
            else:
                raise TypeError(f"a View part must be str, Markup, Component or View, not {part!r}")
        self.parts: tuple[Any, ...] = tuple(flat)
        self.title = title

    def __repr__(self) -> str:
        names = ", ".join(c.name for c in self.components) or "HTML only"
        return f"View({self.title!r}: {names})"

    def __add__(self, other: View) -> View:
        return View(self, other, title=self.title)

    @property
    def components(self) -> list[Component]:
        return [p for p in self.parts if isinstance(p, Component)]

    def render(self, *, bundle: bool = True) -> tuple[str, str]:
        """``(body, script)``: the HTML of the parts and one ``<script type=module>``
        that mounts the components (with the bundle inlined when ``bundle``)."""
        body, calls = [], []
        prefix = "icl-lens-" + uuid.uuid4().hex[:10]
        for i, part in enumerate(self.parts):
            if isinstance(part, Component):
                el_id = f"{prefix}-{i}"
                body.append(
                    f'<div id="{el_id}" class="icl-lens-cv" '
                    f'data-component="{esc(part.name)}" style="margin:10px 0"></div>'
                )
                calls.append(_mount_call(el_id, part))
            else:
                body.append(str(part))
        script = ""
        if calls:
            js = (circuitsvis_bundle() + "\n") if bundle else ""
            script = '<script type="module">\n' + js + "\n".join(calls) + "\n</script>"
        return "\n".join(body), script

    @property
    def local_src(self) -> str:  # type: ignore[override]
        body, script = self.render()
        return f'<div class="icl-lens-view">\n{body}\n</div>\n{script}'

    @property
    def cdn_src(self) -> str:  # type: ignore[override]
        return self.local_src

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def page(self) -> str:
        """A whole HTML document: styles, the parts, the inlined script."""
        return html_page(self.title, self.local_src)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`page` to ``path`` atomically; returns the path.

        >>> View("hello").save(os.path.join(tempfile.mkdtemp(), "v.html")).name
        'v.html'
        """
        return atomic_write_text(path, self.page())


def _mount_call(el_id: str, component: Component) -> str:
    name = json.dumps(component.name)
    return (
        f"try {{ CircuitsVis.render({json.dumps(el_id)}, CircuitsVis[{name}], "
        f"{safe_json(component.props)}); }} catch (err) {{ console.error("
        f"'icl-lens: could not draw ' + {name}, err); }}"
    )


def html_page(title: str, body: str, *, style: str = PAGE_STYLE) -> str:
    """A minimal standalone HTML document around ``body`` (``title`` is escaped)."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------

_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}


def display_tokens(tokens: Sequence[str]) -> list[str]:
    """Tokens as a reader sees them: byte-level BPE / SentencePiece space and newline
    markers become real whitespace; for word-level tokenizers (no token carries its own
    space) a space is put before each word so the text does not run together.

    >>> display_tokens(["<bos>", "Sentence:", "great", "\\n", "Label:"])
    ['<bos>', ' Sentence:', ' great', '\\n', 'Label:']
    >>> display_tokens(["<|endoftext|>", "ĠHello", "Ċ"])
    ['<|endoftext|>', ' Hello', '\\n']
    """
    out = ["".join(_MARKERS.get(ch, ch) for ch in t) for t in tokens]
    if any(t[:1].isspace() and not t.isspace() for t in out[1:]):
        return out
    spaced, previous = [], "\n"
    for i, t in enumerate(out):
        if i == 0 or previous.endswith("\n") or t.isspace() or not t:
            spaced.append(t)
        else:
            spaced.append(" " + t)
        previous = t
    return spaced


def _token_props(tokens: Sequence[str]) -> list[str]:
    """circuitsvis's ColoredTokens / ColoredTokensMulti insert token strings as HTML
    (``innerHTML``): escape ``&``, ``<`` and ``>`` so a token shows as text and can
    never become markup. (Their hover tooltip shows such a token's entities; plain words
    are unaffected.)"""
    return [html.escape(t, quote=False) for t in tokens]


def _prompt_tokens(prompt) -> list[str]:
    if prompt.str_tokens:
        return list(prompt.str_tokens)
    return [str(int(t)) for t in prompt.tokens]


# ---------------------------------------------------------------------------------------
# Meta-gradients
# ---------------------------------------------------------------------------------------


def _layer_index(dec, layer: int) -> int:
    layers = [int(x) for x in dec.layers]
    if layer not in layers:
        raise IndexError(f"layer {layer} was not decomposed; choose one of {layers}")
    return layers.index(layer)


def _check_head(dec, head: int, n: int) -> None:
    n_heads, n_pos = dec.zsl.shape[1], dec.zsl.shape[2]
    if not 0 <= head < n_heads:
        raise IndexError(f"head {head} out of range: the model has {n_heads} heads")
    if not 0 <= n < n_pos:
        raise IndexError(f"n={n} out of range: {n_pos} position(s) were decomposed")


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

    def to_dict(self) -> dict[str, Any]:
        return _plain(
            {
                "layer": self.layer,
                "head": self.head,
                "position": self.position,
                "tokens": self.tokens,
                "is_demo": self.is_demo,
                "values": self.values,
                "stats": self.stats,
                "labels": list(self.labels) if self.labels else None,
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
            values={
                str(k): [float("nan") if x is None else float(x) for x in v]
                for k, v in data["values"].items()
            },
            stats={
                str(k): float("nan") if v is None else float(v)
                for k, v in data.get("stats", {}).items()
            },
            labels=None if not labels else (str(labels[0]), str(labels[1])),
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
        return View(*self._parts(), title=f"icl-lens: L{self.layer}H{self.head} meta-gradients")

    def _parts(self) -> list[Any]:
        name = f"L{self.layer}H{self.head}"
        s = self.stats
        facts = [
            f"|dW_ICL q| = {_fmt(s.get('icl_norm'))}",
            f"|W_ZSL q| = {_fmt(s.get('zsl_norm'))}",
            f"ratio = {_fmt(s.get('icl_norm_ratio'))}",
            f"attention mass on demonstrations = {_fmt(s.get('demo_mass'))}",
            f"cos(relaxed, softmax) = {_fmt(s.get('relax_cos'))}",
        ]
        shown = display_tokens(self.tokens)
        query = "".join(t for t, d in zip(shown, self.is_demo, strict=True) if not d)
        first = next(iter(self.values))
        sign = "blue: positive, red: negative"
        if first.startswith("push toward") and self.labels:
            sign = f"blue: toward {self.labels[1]}, red: toward {self.labels[0]}"
        elif first == "label effect":
            sign = "blue: toward the second label word, red: toward the first"
        lead = (
            f"Colour: {esc(first)} ({esc(sign)}); switch the value with the buttons, "
            "hover a token for all values."
        )
        parts: list[Any] = [
            Markup(f'<div class="panel"><h3>Meta-gradients of head {esc(name)}</h3>'),
            Markup(f'<p class="note">{esc("; ".join(facts))}</p>'),
            Markup(
                f'<p class="note">Query side (BOS and query, the W_ZSL q terms), up to '
                f'position {self.position}: <span class="query">{esc(query)}</span></p>'
            ),
            Markup(f'<p class="note">{lead}</p>'),
            Component(
                "ColoredTokensMulti",
                {
                    "tokens": _token_props(shown),
                    "values": [list(row) for row in zip(*self.values.values(), strict=True)],
                    "labels": list(self.values),
                },
            ),
            Markup(_top_table(self.top_tokens(6, by=first), first)),
            Markup("</div>"),
        ]
        return parts


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    try:
        value = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5")


def _top_table(frame: pd.DataFrame, by: str) -> str:
    if frame.empty:
        return ""
    rows = "".join(
        f'<tr><td>{int(r.position)}</td><td class="text">{esc(_visible(r.token))}</td>'
        f"<td>{_fmt(r[by])}</td></tr>"
        for _, r in frame.iterrows()
    )
    return (
        f'<table class="data"><tr><th>position</th><th>demonstration token</th>'
        f"<th>{esc(by)}</th></tr>{rows}</table>"
    )


def meta_gradients(
    dec, layer: int, head: int, n: int = 0, *, labels: tuple[str, str] | None = None
) -> MetaGradients:
    """Per-token terms ``v_j (k_j . q)`` of one head at recorded position ``n``.

    Values per token (up to the position): ``label effect`` (through W_O onto the label
    logit-difference direction; only with ``decompose(..., label_tokens=...)``),
    ``along head output`` (through W_O, signed projection on the head's real output
    ``z W_O``), ``norm`` (of the term through W_O), ``attention`` (softmax weight) and
    ``k.q`` (raw dot product). ``labels=(a, b)`` names the label words for the caption.

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3", separator=" \\n")
    >>> mg = meta_gradients(il.decompose(model, p), layer=1, head=0)
    >>> len(mg.tokens) == p.n_tokens, list(mg.values)[:2]
    (True, ['along head output', 'norm'])
    """
    li = _layer_index(dec, layer)
    _check_head(dec, head, n)
    pos = int(dec.positions[n])
    upto = slice(0, pos + 1)
    kq = dec.key_dot_query[li, head, n, upto]
    terms = dec.values[li, head, upto] * kq[:, None]  # pos d_head
    resid = terms @ dec.W_O[li, head]  # pos d_model
    out = dec.z[li, head, n] @ dec.W_O[li, head]
    unit = out / out.norm().clamp(min=1e-30)
    values: dict[str, Tensor] = {}
    if dec.label_direction is not None:
        key = "label effect" if labels is None else f"push toward {labels[1]} vs {labels[0]}"
        values[key] = resid @ dec.label_direction[li, n]
    values["along head output"] = resid @ unit
    values["norm"] = resid.norm(dim=-1)
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
    return MetaGradients(
        layer=int(layer),
        head=int(head),
        position=pos,
        tokens=_prompt_tokens(dec.prompt)[upto],
        is_demo=[bool(x) for x in dec.demo_mask[upto]],
        values={k: [float(x) for x in v.detach().double()] for k, v in values.items()},
        stats=stats,
        labels=labels,
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
    :meth:`Decomposition.to_frame` column, default ``|dW_ICL q|``) at position ``n``."""
    frame = dec.to_frame()
    frame = frame[frame["position"] == int(dec.positions[n])]
    if by not in frame:
        raise KeyError(f"unknown column {by!r}; choose from {list(frame.columns[3:])}")
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
    intro = Markup(
        f"<h3>Top heads by |dW_ICL q|: {esc(', '.join(f'L{la}H{h}' for la, h in heads))}</h3>"
    )
    return View(intro, *(meta_gradient_view(dec, la, h, n, labels=labels) for la, h in heads))


# ---------------------------------------------------------------------------------------
# Attention under ZSL / ICL / FT
# ---------------------------------------------------------------------------------------


def query_attention(
    model, tokens: Tensor, *, layers: Sequence[int]
) -> Float[Tensor, "layer head pos pos"]:
    """Softmax attention patterns of ``tokens`` (one sequence, used as given) at
    ``layers``, from ``hook_pattern``."""
    from icl_lens.hooks.capture import Capture
    from icl_lens.model.adapter import adapt

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
        return _plain(
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
        masses = ", ".join(
            f"H{h}: {_fmt(m, 2)}" for h, m in zip(self.heads, self.demo_mass, strict=False)
        )
        note = (
            "Attention of each query token over BOS and the query, side by side per head: "
            f"{', '.join(SETTING_NAMES.get(s, s.upper()) for s in self.patterns)}. "
            "ICL rows leave out the mass on demonstrations" + (f" ({masses})." if masses else ".")
        )
        return View(
            Markup(f'<div class="panel"><h3>Attention of the query, layer {self.layer}</h3>'),
            Markup(f'<p class="note">{esc(note)}</p>'),
            Component(
                "AttentionHeads",
                {
                    "attention": stacked,
                    # AttentionHeads draws tokens on a canvas (chart axes), never as
                    # HTML: they go in as plain text (the browser test checks both).
                    "tokens": display_tokens(self.tokens),
                    "attentionHeadNames": names,
                    "maskUpperTri": True,
                },
            ),
            Markup("</div>"),
            title=f"icl-lens: attention at layer {self.layer}",
        )


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
    ``.view()`` draws them side by side.

    >>> from tests.models import make_model, make_tokenizer
    >>> import icl_lens as il
    >>> model, _ = make_model("gpt2")
    >>> p = il.build_prompt(make_tokenizer(), ["w1 good", "w2 bad"], "w3 w4", separator=" \\n")
    >>> cmp = attention_comparison(model, p, layer=1, heads=[0, 2])
    >>> sorted(cmp.patterns), len(cmp.tokens), len(cmp.patterns["icl"][0])
    (['icl', 'zsl'], 3, 3)
    """
    side = torch.cat([prompt.tokens[:1], prompt.tokens[prompt.query_start :]])
    side_idx = [0, *range(prompt.query_start, prompt.n_tokens)]
    n_heads = _n_heads(model)
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise IndexError(f"heads {bad} out of range: the model has {n_heads} heads")
    icl = query_attention(model, prompt.tokens, layers=[layer])[0]  # head pos pos
    idx = torch.tensor(side_idx)
    icl_side = icl[heads][:, idx][:, :, idx]
    demo_mass = icl[heads, -1][:, prompt.demo_mask].sum(-1)
    patterns = {"zsl": query_attention(model, side, layers=[layer])[0][heads]}
    patterns["icl"] = icl_side
    if ft_model is not None:
        patterns["ft"] = query_attention(ft_model, side, layers=[layer])[0][heads]
    tokens = _prompt_tokens(prompt)
    return AttentionComparison(
        layer=int(layer),
        heads=heads,
        tokens=[tokens[i] for i in side_idx],
        patterns={k: v.tolist() for k, v in patterns.items()},
        demo_mass=[float(x) for x in demo_mass],
    )


def _n_heads(model) -> int:
    return int(model.cfg.n_heads)


# ---------------------------------------------------------------------------------------
# Overview heatmaps (inline SVG)
# ---------------------------------------------------------------------------------------


def head_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean per (layer, head) of a :meth:`Decomposition.to_frame` frame (over
    positions, or over queries when frames of several prompts are concatenated), with
    ``relax_gap = 1 - relax_cos``."""
    cols = [c for c in frame.columns if c not in ("layer", "head", "position", "query")]
    out = frame.groupby(["layer", "head"], as_index=False)[cols].mean()
    if "relax_cos" in out:
        out["relax_gap"] = 1.0 - out["relax_cos"]
    return out


def _color(value: float, lo: float, hi: float, diverging: bool) -> str:
    if not math.isfinite(value):
        return "#e2e8f0"
    if diverging:
        m = max(abs(lo), abs(hi), 1e-12)
        t = max(-1.0, min(1.0, value / m))
        end = (178, 24, 43) if t > 0 else (33, 102, 172)
        a = abs(t)
    else:
        span = hi - lo if hi > lo else 1.0
        a = max(0.0, min(1.0, (value - lo) / span))
        end = (33, 102, 172)
    rgb = [round(255 + (e - 255) * a) for e in end]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def heatmap_svg(
    matrix: Float[np.ndarray, "row col"],
    *,
    title: str,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    diverging: bool | None = None,
    cell: int | None = None,
) -> str:
    """A small SVG heatmap (hover a cell for its value); NaN cells are grey. Diverging
    (red positive / blue negative, centred at 0) when values of both signs occur."""
    m = np.asarray(matrix, dtype=float)
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if diverging is None:
        diverging = lo < 0 < hi
    if cell is None:  # about 300 px for big models, 26 px cells for small ones
        cell = max(12, min(26, 300 // max(m.shape)))
    left, top = 38, 34
    width = max(left + cell * m.shape[1] + 8, 7 * len(title) + 8)
    height = top + cell * m.shape[0] + 22
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{width}" '
        f'height="{height}" role="img" aria-label="{esc(title)}">',
        f'<text x="0" y="14" font-size="12" font-weight="bold">{esc(title)}</text>',
    ]
    for j, label in enumerate(col_labels):
        x = left + j * cell + cell / 2
        out.append(
            f'<text x="{x}" y="{top - 4}" font-size="10" text-anchor="middle">{esc(label)}</text>'
        )
    for i, label in enumerate(row_labels):
        y = top + i * cell + cell / 2 + 4
        out.append(
            f'<text x="{left - 4}" y="{y}" font-size="10" text-anchor="end">{esc(label)}</text>'
        )
        for j in range(m.shape[1]):
            v = float(m[i, j])
            out.append(
                f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 1}" '
                f'height="{cell - 1}" fill="{_color(v, lo, hi, diverging)}">'
                f"<title>{esc(row_labels[i])} {esc(col_labels[j])}: {_fmt(v)}</title></rect>"
            )
    scale = (
        f"{_fmt(-max(abs(lo), abs(hi)))} .. 0 .. {_fmt(max(abs(lo), abs(hi)))}"
        if diverging
        else f"{_fmt(lo)} .. {_fmt(hi)}"
    )
    out.append(
        f'<text x="{left}" y="{height - 6}" font-size="10" fill="#4a5568">{esc(scale)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


OVERVIEW_COLUMNS = {
    "demo_mass": "attention mass on demonstrations",
    "relax_gap": "relaxation gap 1 - cos(relaxed, softmax)",
    "icl_norm_ratio": "|dW_ICL q| / |W_ZSL q|",
    "icl_effect": "dW_ICL q effect on the label logit difference",
}


def _metric_grids(metrics: pd.DataFrame) -> list[tuple[str, np.ndarray, list[str], list[str]]]:
    """Per-head (layer x head) and per-layer (layer x 1) grids of the observed metrics."""
    grids = []
    observed = metrics[(metrics["baseline"] == "none") & (metrics["layer"] >= 0)]
    for (metric, variant), rows in observed.groupby(["metric", "variant"], sort=False):
        if metric not in ("simam", "simaou", "kendall"):
            continue
        per_head = rows[rows["head"] >= 0]
        if not per_head.empty:
            grid = per_head.pivot_table(index="layer", columns="head", values="value")
            grids.append(
                (
                    f"{metric} ({variant}) per head",
                    grid.to_numpy(),
                    [f"L{int(x)}" for x in grid.index],
                    [f"H{int(x)}" for x in grid.columns],
                )
            )
        else:
            col = rows[rows["head"] < 0].sort_values("layer")
            if not col.empty:
                grids.append(
                    (
                        f"{metric} ({variant}) per layer",
                        col["value"].to_numpy()[:, None],
                        [f"L{int(x)}" for x in col["layer"]],
                        ["all"],
                    )
                )
    return grids


def overview_view(
    frame: pd.DataFrame | None = None,
    metrics: pd.DataFrame | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> View:
    """Layer x head heatmaps: from a decomposition frame (``dec.to_frame()`` or
    :func:`head_summary` of it) the attention mass on demonstrations, the relaxation gap
    and ``|dW_ICL q| / |W_ZSL q|``; from a metrics frame (the tidy analyses format) the
    per-head SimAM and the per-layer SimAOU / Kendall.

    >>> frame = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
    ...                       "demo_mass": [.1, .5, .2, .9], "relax_cos": [.9, .8, .7, .6],
    ...                       "icl_norm_ratio": [1., 2., 3., 4.]})
    >>> overview_view(frame).local_src.count("<svg")
    3
    """
    parts: list[str] = []
    if frame is not None and len(frame):
        summary = head_summary(frame) if "relax_gap" not in frame else frame
        cols = (
            list(columns) if columns is not None else [c for c in OVERVIEW_COLUMNS if c in summary]
        )
        for col in cols:
            grid = summary.pivot_table(index="layer", columns="head", values=col)
            parts.append(
                heatmap_svg(
                    grid.to_numpy(),
                    title=OVERVIEW_COLUMNS.get(col, col),
                    row_labels=[f"L{int(x)}" for x in grid.index],
                    col_labels=[f"H{int(x)}" for x in grid.columns],
                )
            )
    if metrics is not None and len(metrics):
        for title, grid, rows, cols in _metric_grids(metrics):
            parts.append(heatmap_svg(grid, title=title, row_labels=rows, col_labels=cols))
    if not parts:
        return View("Nothing to show: no decomposition frame and no per-layer metrics.")
    return View(
        Markup('<div class="panel"><h3>Layer x head overview</h3><div class="heatmaps">'),
        Markup("".join(f"<div>{p}</div>" for p in parts)),
        Markup("</div></div>"),
        title="icl-lens: overview",
    )
