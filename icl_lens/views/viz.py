"""Every view of icl-lens in one namespace, for a notebook: ``from icl_lens.views import viz``.

Each lives in the module of its job: :mod:`~icl_lens.views.meta_gradients` (one head's
per-token terms), :mod:`~icl_lens.views.attention` (the query's attention under ZSL /
ICL / FT), :mod:`~icl_lens.views.heatmaps` (layer x head grids),
:mod:`~icl_lens.views.figures` (matplotlib figures) and :mod:`~icl_lens.views.page`
(:class:`View`, templates, escaping). Views display in Jupyter and ``view.save(path)``
writes one self-contained page; they render offline (circuitsvis's bundle inlined).

>>> import icl_lens as il
>>> model = il.toy_model()                                            # doctest: +SKIP
>>> dec = il.decompose(model, il.icl_prompt(model, shots=8))          # doctest: +SKIP
>>> viz.meta_gradient_views(dec, k=3).save("heads.html")              # doctest: +SKIP
"""

from icl_lens.files import OutputPathError, atomic_write_text
from icl_lens.views.attention import AttentionComparison, attention_comparison, query_attention
from icl_lens.views.figures import plot_accuracy, plot_layers
from icl_lens.views.heatmaps import (
    head_summary,
    overview_view,
    plot_decomposition_heads,
    plot_metric_heads,
)
from icl_lens.views.meta_gradients import (
    MetaGradients,
    meta_gradient_view,
    meta_gradient_views,
    meta_gradients,
    top_heads,
)
from icl_lens.views.page import (
    Component,
    Markup,
    Panel,
    View,
    circuitsvis_bundle,
    display_tokens,
    safe_json,
)

__all__ = [
    "AttentionComparison",
    "Component",
    "Markup",
    "MetaGradients",
    "OutputPathError",
    "Panel",
    "View",
    "atomic_write_text",
    "attention_comparison",
    "circuitsvis_bundle",
    "display_tokens",
    "head_summary",
    "meta_gradient_view",
    "meta_gradient_views",
    "meta_gradients",
    "overview_view",
    "plot_accuracy",
    "plot_decomposition_heads",
    "plot_layers",
    "plot_metric_heads",
    "query_attention",
    "safe_json",
    "top_heads",
]
