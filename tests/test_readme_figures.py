"""scripts/readme_figures.py makes the README's pictures: it runs on the toy model and
writes a screenshot of the meta-gradient view that is not blank and a figure; the README
shows the committed ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.chromium import assert_not_blank, find_chromium, png_pixels

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme_figures.py"


def _script():
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_script_writes_a_drawn_screenshot_and_a_figure(tmp_path):
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    script = _script()
    assert script.main(["--out", str(tmp_path), "--shots", "4", "--queries", "12"]) == 0
    view, curve = tmp_path / script.VIEW_FILE, tmp_path / script.CURVE_FILE
    width, height, pixels = png_pixels(view.read_bytes())
    assert (width, height) == script.WINDOW
    # coloured tokens: many colours and some saturated ones (circuitsvis drew them)
    assert_not_blank(view.read_bytes(), "the meta-gradient screenshot", min_colours=50)
    assert sum(1 for p in pixels if max(p) - min(p) > 60) > 500
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curve.stat().st_size > 10_000


def test_the_readme_shows_the_committed_pictures():
    script = _script()
    readme = (ROOT / "README.md").read_text()
    for name in (script.VIEW_FILE, script.CURVE_FILE):
        path = ROOT / "docs" / "images" / name
        assert path.is_file() and 10_000 < path.stat().st_size < 400_000, path
        assert f"](docs/images/{name})" in readme
    assert readme.startswith("# icl-lens\n\n```bash\npip install torch")  # its two commands
