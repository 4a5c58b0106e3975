"""The HTML side of every view: :class:`View`, the Jinja2 templates, script-safe JSON.

Pages are rendered from the Jinja2 templates in ``icl_lens/views/templates`` (package
data) with autoescaping on: every value a template prints is HTML-escaped unless it is
:class:`Markup` (HTML this package built itself, from templates or matplotlib).

Autoescaping is right for HTML text and attributes, and wrong inside ``<script>``: a
script is raw text, where the browser decodes no entities, so an HTML-escaped
``&lt;`` would reach JavaScript as four characters and corrupt the data; and what must be
neutralised there is different (``</script``, ``<!--``). So the props of circuitsvis
components go through :func:`safe_json` (JSON with ``<``, ``>``, ``&``, U+2028, U+2029 as
``\\u`` escapes: the same values once parsed, and nothing that can end the script) and
circuitsvis's bundle through :func:`circuitsvis_bundle` (every ``</script`` written
``<\\/script``), and are only then marked safe for the template.

>>> v = View(Markup("<h3>title</h3>"), "<b>not bold</b>")
>>> "&lt;b&gt;not bold&lt;/b&gt;" in v.local_src
True
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from circuitsvis.utils.render import RenderedHTML
from markupsafe import Markup
from torch import Tensor

from icl_lens.files import atomic_write_text

__all__ = [
    "Component",
    "Markup",
    "Panel",
    "View",
    "circuitsvis_bundle",
    "display_tokens",
    "fmt",
    "mount_script",
    "render",
    "render_views",
    "safe_json",
]

SETTING_NAMES = {"zsl": "ZSL", "icl": "ICL", "ft": "FT"}

# ---------------------------------------------------------------------------------------
# Values for JSON and for people
# ---------------------------------------------------------------------------------------

_JS_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def plain(obj: Any) -> Any:
    """Tensors and arrays to lists, non-finite floats to None (JSON null)."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def safe_json(obj: Any) -> Markup:
    """JSON that is safe inside an HTML ``<script>``: ``<``, ``>``, ``&``, U+2028 and
    U+2029 are written as ``\\u`` escapes (same value once parsed).

    >>> str(safe_json({"t": "</script><b>&"}))
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(plain(obj), allow_nan=False, ensure_ascii=False)
    return Markup(re.sub("[<>&\u2028\u2029]", lambda m: _JS_UNSAFE[m.group()], text))


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` for missing or non-finite, scientific notation for
    very large or small magnitudes; anything else as its string.

    >>> fmt(0.12345), fmt(float("nan")), fmt(1.5e-5), fmt("text")
    ('0.123', 'n/a', '1.50e-05', 'text')
    """
    if x is None:
        return "n/a"
    try:
        value = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


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


# ---------------------------------------------------------------------------------------
# Templates and the circuitsvis bundle
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The package's Jinja2 environment: templates from ``icl_lens/views/templates``,
    autoescaping on, undefined names an error, ``script_json`` (:func:`safe_json`) and
    ``fmt`` as filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("icl_lens.views", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["script_json"] = safe_json
    env.filters["fmt"] = fmt
    return env


def render(template: str, **context: Any) -> Markup:
    """Render one of the package's templates; the result is :class:`Markup`."""
    return Markup(environment().get_template(template).render(**context))


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> Markup:
    """circuitsvis's browser bundle (the JavaScript ``local_src`` inlines), with every
    ``</script`` written as ``<\\/script`` so it cannot end the surrounding tag."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(
            f"circuitsvis's JavaScript bundle is missing ({path}); reinstall circuitsvis"
        )
    js = path.read_text(encoding="utf-8")
    return Markup(re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE))


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


def mount_script(mounts: Sequence[Mapping[str, Any]], *, bundle: bool = True) -> Markup:
    """One ``<script type=module>`` that mounts ``mounts`` (``id``, ``name``, ``props``),
    with circuitsvis's bundle inlined when ``bundle``; empty with nothing to mount."""
    if not mounts:
        return Markup("")
    js = circuitsvis_bundle() if bundle else Markup("")
    return render("mount.html.j2", bundle=js, mounts=mounts)


def render_views(views: Mapping[str, View], *, prefix: str) -> tuple[dict[str, Markup], Markup]:
    """Views shown in different places of one page: each one's body (element ids
    ``{prefix}-{name}-{n}``) and one script that mounts them all, circuitsvis's bundle
    inlined once.

    >>> bodies, script = render_views({"a": View("one"), "b": View("two")}, prefix="p")
    >>> sorted(bodies), str(script)
    (['a', 'b'], '')
    """
    mounts: list[dict[str, Any]] = []
    bodies = {name: view._body(f"{prefix}-{name}", mounts) for name, view in views.items()}
    return bodies, mount_script(mounts)


@dataclass(frozen=True)
class Component:
    """A circuitsvis React component (e.g. ``"ColoredTokensMulti"``) and its props."""

    name: str
    props: Mapping[str, Any]


class Panel:
    """A bordered box around view parts (what a template cannot wrap: a component)."""

    def __init__(self, *parts: Any):
        self.parts = _flatten(parts)


def _flatten(parts: Sequence[Any]) -> tuple[Any, ...]:
    flat: list[Any] = []
    for part in parts:
        if isinstance(part, View):
            flat.extend(part.parts)
        elif isinstance(part, (Markup, Component, Panel)):
            flat.append(part)
        elif isinstance(part, str):
            flat.append(Markup("<p>{}</p>").format(part))
        else:
            raise TypeError(
                f"a View part must be str, Markup, Component, Panel or View, not {part!r}"
            )
    return tuple(flat)


class View(RenderedHTML):
    """HTML parts and circuitsvis components that display in a notebook and save as
    one self-contained page.

    Parts: :class:`Markup` (trusted HTML), :class:`Component`, :class:`Panel`, another
    ``View``, or a plain ``str`` (escaped, shown as text). ``local_src`` inlines
    circuitsvis's JavaScript once per view; ``cdn_src`` is the same (never a CDN);
    displaying it never probes the network. Views add up: ``view_a + view_b``.
    """

    def __init__(self, *parts: Any, title: str = "icl-lens"):
        self.parts: tuple[Any, ...] = _flatten(parts)
        self.title = title

    def __repr__(self) -> str:
        names = ", ".join(c.name for c in self.components) or "HTML only"
        return f"View({self.title!r}: {names})"

    def __add__(self, other: View) -> View:
        return View(self, other, title=self.title)

    @property
    def components(self) -> list[Component]:
        found: list[Component] = []

        def walk(parts: Sequence[Any]) -> None:
            for p in parts:
                if isinstance(p, Component):
                    found.append(p)
                elif isinstance(p, Panel):
                    walk(p.parts)

        walk(self.parts)
        return found

    def render(self, *, bundle: bool = True, prefix: str | None = None) -> tuple[Markup, Markup]:
        """``(body, script)``: the HTML of the parts and one ``<script type=module>``
        that mounts the components (with the bundle inlined when ``bundle``). Element
        ids start with ``prefix``: random by default, so that views shown together in a
        notebook never share one; a page of its own can fix it (the report does)."""
        prefix = prefix or "icl-lens-" + uuid.uuid4().hex[:10]
        mounts: list[dict[str, Any]] = []
        body = self._body(prefix, mounts)
        return body, mount_script(mounts, bundle=bundle)

    def _body(self, prefix: str, mounts: list[dict[str, Any]]) -> Markup:
        """The parts' HTML, each component a placeholder ``{prefix}-{n}`` added to
        ``mounts``."""

        def tree(parts: Sequence[Any]) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for part in parts:
                if isinstance(part, Component):
                    el_id = f"{prefix}-{len(mounts)}"
                    mounts.append({"id": el_id, "name": part.name, "props": part.props})
                    out.append({"component": part.name, "id": el_id})
                elif isinstance(part, Panel):
                    out.append({"panel": tree(part.parts)})
                else:
                    out.append({"html": part})
            return out

        return render("parts.html.j2", parts=tree(self.parts))

    @property
    def local_src(self) -> str:  # type: ignore[override]
        body, script = self.render()
        return str(Markup('<div class="icl-lens-view">\n{}\n</div>\n{}').format(body, script))

    @property
    def cdn_src(self) -> str:  # type: ignore[override]
        return self.local_src

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def page(self) -> str:
        """A whole HTML document: styles, the parts, the inlined script."""
        return str(render("page.html.j2", title=self.title, body=Markup(self.local_src)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`page` to ``path`` atomically; returns the path.

        >>> import tempfile
        >>> View("hello").save(os.path.join(tempfile.mkdtemp(), "v.html")).name
        'v.html'
        """
        return atomic_write_text(path, self.page())
