"""The tutorial notebook (docs/tutorial.ipynb) executes cleanly on the toy model."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"


@pytest.mark.slow
def test_tutorial_notebook_executes():
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    views = [h for h in html if "CircuitsVis.render" in h]
    # the meta-gradient view, the attention comparison, the transplanted update
    assert len(views) >= 3
    assert any("Transplanted update of head" in h for h in views)
    assert all("unpkg.com" not in h for h in views)  # inlined, never from a CDN
    # dec.plot_heads(), cmp.plot_layers(), res.plot_heads() and res.plot_curve() return
    # matplotlib figures that show as images (no pyplot needed), once each
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4, [o.get("data", {}).get("text/plain") for o in outputs]
    assert any("report.html" in o.get("text", "") for o in outputs)
