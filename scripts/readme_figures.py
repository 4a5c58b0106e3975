"""The README's two pictures, made on the embedded toy model (not by hand):

- ``meta_gradients.png``: the meta-gradient view of the README's example
  (``dec.view_meta_gradients(layer=2, head=1)`` on ``il.icl_prompt(model, task="toy",
  shots=8, seed=3)``), rendered to HTML and screenshotted in headless Chromium;
- ``interventions_curve.png``: ``il.intervene(...).plot_curve()`` on the toy task with
  arbitrary label words (8 demonstrations, 48 queries): what the top-k heads recover
  and remove against k random heads.

    python scripts/readme_figures.py                # writes docs/images/
    python scripts/readme_figures.py --out /tmp/x --queries 12 --shots 4   # quicker

Chromium: ``$ICL_LENS_CHROMIUM``, ``chromium`` or ``chromium-browser`` on the PATH
(``apt-get install chromium``); it runs headless, with its networking off and an empty
profile of its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import icl_lens as il
from icl_lens.toy import toy_task

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the browser flags the tests use: tests/chromium.py
from tests.chromium import HEADLESS, find_chromium  # noqa: E402

VIEW_FILE = "meta_gradients.png"
CURVE_FILE = "interventions_curve.png"
WINDOW = (960, 470)


def screenshot(html: Path, png: Path, *, window: tuple[int, int] = WINDOW) -> Path:
    """``html`` as a PNG of ``window`` pixels, in headless Chromium with an empty
    profile and no network."""
    binary = find_chromium()
    if binary is None:
        raise SystemExit(
            "no Chromium found: install it (apt-get install chromium) or set ICL_LENS_CHROMIUM "
            "to its path"
        )
    with tempfile.TemporaryDirectory(prefix="icl-lens-chromium-") as profile:
        command = [
            binary,
            *HEADLESS,
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--screenshot={png}",
            f"--window-size={window[0]},{window[1]}",
            html.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium could not screenshot {html}: {done.stderr[-2000:]}")
    return png


def meta_gradient_view(model, out: Path) -> Path:
    """The README's meta-gradient example, screenshotted."""
    prompt = il.icl_prompt(model, task="toy", shots=8, seed=3)
    dec = il.decompose(model, prompt)
    with tempfile.TemporaryDirectory() as tmp:
        html = dec.view_meta_gradients(layer=2, head=1).save(Path(tmp) / "view.html")
        return screenshot(html, out / VIEW_FILE)


def interventions_curve(model, out: Path, *, shots: int, queries: int) -> Path:
    """The top-k curves of the toy task with arbitrary label words."""
    task = toy_task(0, kind="arbitrary", n_validation=queries)
    result = il.intervene(model, task, shots=shots, seed=0, lr_grid="short", progress=False)
    path = out / CURVE_FILE
    result.plot_curve().savefig(path, dpi=100, metadata={"Software": None})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--queries", type=int, default=48)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = il.toy_model()
    for path in (
        meta_gradient_view(model, args.out),
        interventions_curve(model, args.out, shots=args.shots, queries=args.queries),
    ):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
