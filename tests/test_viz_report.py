"""Views and the HTML report: values against the decomposition, escaping, atomic
writes, the CLI, and a real headless Chromium with networking off that loads every page
and checks that the circuitsvis components mounted, nothing is blank, nothing logs an
error and no dataset payload runs."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
import torch

import icl_lens as il
from icl_lens import analyses as ila
from icl_lens.cli.report import report_main
from icl_lens.views import viz
from icl_lens.views.report import ViewData, collect_views, load_run, write_report
from tests.models import make_model, make_tokenizer

PAYLOAD_SCRIPT = "<script>window.__xss=1;document.title='pwned'</script>"
PAYLOAD_IMG = '"><img src=x onerror="window.__xss=2;document.title=\'pwned\'">'
# circuitsvis turns whitespace in tokens into &nbsp;, which defuses the two above inside
# its components; this one has no whitespace and runs if a token ever reaches innerHTML
PAYLOAD_TIGHT = "<img/src/onerror=window.__xss=3>"
PAYLOADS = (PAYLOAD_SCRIPT, PAYLOAD_IMG, PAYLOAD_TIGHT)


# ---------------------------------------------------------------------------------------
# fixtures: a small model, a prompt whose token strings carry the payloads, a run dir
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model("gpt2")[0]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    demos = ["Sentence: w1 w2 Label: good", "Sentence: w3 Label: bad", "Sentence: w5 Label: good"]
    return il.build_prompt(tokenizer, demos, "Sentence: w4 w6 Label:", separator=" \n")


@pytest.fixture(scope="module")
def label_ids(tokenizer):
    return tuple(tokenizer.convert_tokens_to_ids(["bad", "good"]))


@pytest.fixture(scope="module")
def evil_prompt(prompt):
    """The same token ids, but token strings that are XSS payloads (a demonstration
    token and two query tokens)."""
    toks = list(prompt.str_tokens)
    toks[2] = PAYLOAD_SCRIPT
    toks[prompt.query_start + 1] = PAYLOAD_IMG
    toks[prompt.query_start + 2] = PAYLOAD_SCRIPT
    toks[3] = toks[prompt.query_start + 3] = PAYLOAD_TIGHT
    return dataclasses.replace(prompt, str_tokens=tuple(toks))


@pytest.fixture(scope="module")
def dec(model, prompt, label_ids):
    return il.decompose(model, prompt, label_tokens=label_ids)


def _metrics_frame():
    g = torch.Generator().manual_seed(0)
    n, layers, heads = 10, 2, 4
    outs = {s: torch.randn(n, layers, 16, generator=g) for s in ("zsl", "icl", "ft")}
    scores = {s: torch.randn(n, layers, heads, 5, generator=g) for s in ("zsl", "icl", "ft")}
    correct = {
        "zsl": [0, 1, 0, 0, 1, 0, 1, 0, 0, 1],
        "icl": [1, 1, 1, 0, 1, 1, 1, 1, 0, 1],
        "ft": [1, 0, 1, 0, 1, 1, 0, 1, 0, 1],
    }
    kendall = (torch.randn(n, layers, 9, generator=g), torch.randn(n, layers, 9, generator=g))
    return ila.results_frame(
        ila.rec2ftp(**correct, n_resamples=200),
        ila.simaou(**outs, n_resamples=200),
        ila.simam(**scores, n_resamples=200),
        ila.kendall(*kendall, n_resamples=200),
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model, evil_prompt, label_ids):
    """A run directory in the documented shape: results.json (minimum keys plus a
    config whose task name is a payload), metrics.csv (the tidy analyses format) and
    views.json from a real decomposition whose token strings are payloads."""
    out = tmp_path_factory.mktemp("run")
    _metrics_frame().to_csv(out / "metrics.csv", index=False)
    metric = {"value": 0.1, "baselines": {"random_uniform": 0.0}}
    results = {
        "accuracy": {"zsl": 0.55, "icl": 0.9, "ft": 0.7},
        "metrics": {m: metric for m in ("rec2ftp", "simaou", "simam", "kendall")},
        "config": {"task_name": PAYLOAD_IMG, "shots": 3, "seed": 1},
    }
    (out / "results.json").write_text(json.dumps(results))
    other, _ = make_model("gpt2", seed=1)  # stands in for a finetuned model
    views = collect_views(
        model,
        evil_prompt,
        ft_model=other,
        label_tokens=label_ids,
        labels=(PAYLOAD_SCRIPT, "good"),
        k=2,
        query=" and ".join(PAYLOADS),
    )
    views.save(out)
    write_report(out)
    return out


# ---------------------------------------------------------------------------------------
# views: values
# ---------------------------------------------------------------------------------------


def test_meta_gradients_sum_to_the_decomposition(dec, prompt):
    frame = dec.to_frame().set_index(["layer", "head"])
    for layer, head in [(0, 1), (1, 3)]:
        mg = viz.meta_gradients(dec, layer, head)
        assert mg.tokens == list(prompt.str_tokens)
        assert sum(mg.is_demo) == int(prompt.demo_mask.sum())
        demo = torch.tensor(mg.is_demo)
        effect = torch.tensor(mg.values["label effect"], dtype=torch.float64)
        expected = frame.loc[(layer, head), "icl_effect"]
        assert effect[demo].sum().item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
        attention = torch.tensor(mg.values["attention"], dtype=torch.float64)
        assert attention[demo].sum().item() == pytest.approx(
            frame.loc[(layer, head), "demo_mass"], rel=1e-5
        )
        # signed projection on the head's real output: sum over all tokens is the
        # relaxed output's projection
        out = dec.z[layer, head, 0] @ dec.W_O[layer, head]
        relaxed = dec.relaxed[layer, head, 0] @ dec.W_O[layer, head]
        along = torch.tensor(mg.values["along head output"], dtype=torch.float64)
        assert along.sum().item() == pytest.approx(
            float(relaxed @ out / out.norm()), rel=1e-4, abs=1e-7
        )
        assert mg.stats["icl_norm"] == pytest.approx(frame.loc[(layer, head), "icl_norm"])


def test_top_heads_are_ordered_by_icl_norm(dec):
    frame = dec.to_frame().sort_values("icl_norm", ascending=False)
    expected = [(int(r.layer), int(r.head)) for r in frame.head(3).itertuples()]
    assert viz.top_heads(dec, 3) == expected


def test_view_errors_are_actionable(dec):
    with pytest.raises(IndexError, match="layer 7 was not decomposed"):
        viz.meta_gradients(dec, 7, 0)
    with pytest.raises(IndexError, match="head 9 out of range"):
        viz.meta_gradients(dec, 0, 9)


def test_attention_comparison(model, prompt):
    cmp = viz.attention_comparison(model, prompt, layer=1, heads=[0, 2], ft_model=model)
    side = 1 + prompt.n_tokens - prompt.query_start
    assert len(cmp.tokens) == side and cmp.tokens[0] == prompt.str_tokens[0]
    zsl, icl, ft = (torch.tensor(cmp.patterns[s]) for s in ("zsl", "icl", "ft"))
    assert zsl.shape == (2, side, side)
    torch.testing.assert_close(zsl.sum(-1), torch.ones(2, side))
    torch.testing.assert_close(ft, zsl)  # the "finetuned" model here is the model itself
    # ICL's last row over BOS + query plus its mass on demonstrations is the whole row
    torch.testing.assert_close(icl[:, -1].sum(-1) + torch.tensor(cmp.demo_mass), torch.ones(2))
    names = cmp.view().components[0].props["attentionHeadNames"]
    assert names[:3] == ["ZSL L1H0", "ICL L1H0", "FT L1H0"]


def test_collect_views_finetunes_and_names_the_labels(model, prompt):
    pytest.importorskip("icl_lens.study.finetune")
    pytest.importorskip("icl_lens.study.predict")
    spec = il.TaskSpec("t", "Sentence: {text} Label:", (" bad", " good"), separator=" \n")
    data = collect_views(model, prompt, ft_lr=0.5, spec=spec, k=1)
    assert data.labels == ("bad", "good")
    assert list(data.meta_gradients[0].values)[0] == "push toward good vs bad"
    zsl, ft = (torch.tensor(data.attention.patterns[s]) for s in ("zsl", "ft"))
    assert not torch.allclose(zsl, ft)  # K/V finetuning moved the attention


def test_view_data_round_trip(run_dir):
    data = ViewData.load(run_dir)
    again = ViewData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert again.to_dict() == data.to_dict()
    assert len(data.meta_gradients) == 2 and data.attention is not None
    assert sorted(data.attention.patterns) == ["ft", "icl", "zsl"]


def test_overview_heatmaps(dec):
    metrics = _metrics_frame()
    view = viz.overview_view(dec.to_frame(), metrics)
    html = view.local_src
    for title in ("attention mass on demonstrations", "relaxation gap", "|dW_ICL q| / |W_ZSL q|"):
        assert title in html
    assert "simam (after) per head" in html and "simaou (normalised) per layer" in html
    assert html.count("<svg") == 4 + 3 + 2 + 1  # 4 decomposition, 3 simam, 2 simaou, kendall


# ---------------------------------------------------------------------------------------
# escaping
# ---------------------------------------------------------------------------------------


def test_safe_json_cannot_close_a_script():
    text = viz.safe_json({"t": [PAYLOAD_SCRIPT, "a & b", "\u2028"], "x": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": [PAYLOAD_SCRIPT, "a & b", "\u2028"], "x": None}


def test_plain_strings_are_text_markup_is_html():
    view = viz.View(viz.Markup("<h3>ok</h3>"), PAYLOAD_SCRIPT)
    assert "<h3>ok</h3>" in view.local_src and PAYLOAD_SCRIPT not in view.local_src


def test_views_escape_token_strings(model, evil_prompt, label_ids):
    dec = il.decompose(model, evil_prompt, label_tokens=label_ids)
    views = [
        viz.meta_gradient_view(dec, 1, 0, labels=(PAYLOAD_IMG, "good")),
        viz.meta_gradient_views(dec, k=2),
        viz.attention_comparison(model, evil_prompt, layer=0, ft_model=model).view(),
    ]
    for view in views:
        page = view.page()
        for payload in PAYLOADS:
            assert payload not in page
        assert page.replace(viz.circuitsvis_bundle(), "").count("<script") == 1  # only ours


def test_report_page_never_contains_a_raw_payload(run_dir):
    page = (run_dir / "report.html").read_text()
    for payload in PAYLOADS:
        assert payload not in page
    assert page.replace(viz.circuitsvis_bundle(), "").count("<script") == 1
    assert "&lt;script&gt;window.__xss=1" in page  # shown as text


def test_notebook_display_never_probes_the_network(monkeypatch, dec):
    import circuitsvis.utils.render as render

    def no_network(*args, **kwargs):
        raise AssertionError("the view probed the network")

    monkeypatch.setattr(render, "internet_on", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    view = dec.view_meta_gradients(layer=1, head=0)
    html = view._repr_html_()
    for src in (html, str(view), view.cdn_src, view.local_src):
        assert "CircuitsVis.render" in src and "unpkg.com" not in src


# ---------------------------------------------------------------------------------------
# report files and CLI
# ---------------------------------------------------------------------------------------


def test_report_sections(run_dir):
    page = (run_dir / "report.html").read_text()
    for text in (
        "Accuracy",
        "Metrics",
        "Per layer",
        "Layer x head overview",
        "Top heads by |dW_ICL q|",
        "random_uniform",
        "95% CI",
        "Attention of the query",
    ):
        assert text in page, text
    ours = page.replace(viz.circuitsvis_bundle(), "")
    assert not re.search(r"(src|href|import)\W+https?:", ours)  # nothing of ours to fetch


def test_report_from_results_json_alone(tmp_path):
    results = {
        "accuracy": {"zsl": 0.5, "icl": 0.8, "ft": 0.6},
        "metrics": {
            "simaou": {"value": 0.2, "ci": [0.1, 0.3], "baselines": {"random_uniform": 0.001}},
            "rec2ftp": {"value": 0.7, "baselines": {"independent": 0.5}},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    run = load_run(tmp_path)
    assert set(run.metrics["metric"]) == {"simaou", "rec2ftp"}
    page = write_report(tmp_path).read_text()
    assert "0.200" in page and "[0.100, 0.300]" in page and "No per-token data" in page


def test_atomic_write_and_clear_errors(tmp_path):
    path = viz.atomic_write_text(tmp_path / "a" / "page.html", "one")
    viz.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["page.html"]  # no temp left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(viz.OutputPathError, match="cannot write .*choose a writable"):
        viz.atomic_write_text(blocker / "report.html", "x")
    with pytest.raises(viz.OutputPathError, match="it is a directory"):
        viz.atomic_write_text(tmp_path, "x")


def test_report_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert report_main([str(run_dir), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("x")
    assert report_main([str(run_dir), "--out", str(tmp_path / "blocker" / "r.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_report_subcommand_is_registered(run_dir, tmp_path):
    cli = pytest.importorskip("icl_lens.cli")
    if "report" not in cli.SUBCOMMANDS:
        pytest.skip("the report subcommand is not registered in icl_lens.cli yet")
    out = tmp_path / "cli.html"
    assert cli.main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------------------
# a real browser: headless Chromium over the DevTools pipe, networking off
# ---------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in (os.environ.get("ICL_LENS_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


FD_TRAMPOLINE = """
import fcntl, os, sys
a = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD, 10)
b = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD, 10)
os.dup2(a, 3)
os.dup2(b, 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Chromium:
    """Headless Chromium driven through ``--remote-debugging-pipe`` (the DevTools
    protocol over file descriptors 3 and 4): no websocket, no extra package."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="icl-lens-chromium-")
        self.log = open(os.path.join(self.profile, "stderr.log"), "w+b")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            f"--user-data-dir={self.profile}",
            "--proxy-server=127.0.0.1:9",  # networking off: nothing listens there
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--remote-debugging-pipe",
            "--window-size=1280,1600",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and answers on fd 4: a tiny Python trampoline
        # moves our pipe ends there and execs it (no preexec_fn in a threaded pytest)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FD_TRAMPOLINE, str(to_child_r), str(from_child_w), *args],
            pass_fds=(to_child_r, from_child_w),
            stdout=subprocess.DEVNULL,
            stderr=self.log,  # a file: a full pipe would stall chromium
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.w, self.r = to_child_w, from_child_r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    self.log.seek(0)
                    err = self.log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"chromium exited: {err}")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@dataclasses.dataclass
class PageResult:
    title: str
    state: dict
    errors: list[str]
    requests: list[str]
    screenshot: bytes
    component_shots: list[bytes | None]


def _load_page(browser: Chromium, path: Path) -> PageResult:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    browser.events.clear()
    for domain in ("Runtime", "Log", "Page", "Network"):
        browser.send(f"{domain}.enable", session=session)

    def evaluate(expression: str):
        result = browser.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        return result["result"].get("value")

    browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session)
    state_js = """(() => {
      const cv = Array.from(document.querySelectorAll('.icl-lens-cv'));
      return {
        components: cv.length,
        mounted: cv.filter(
          e => e.childElementCount > 0 && e.getBoundingClientRect().height > 20).length,
        names: cv.map(e => e.dataset.component),
        canvases: document.querySelectorAll('.icl-lens-cv canvas').length,
        scripts: document.querySelectorAll('script').length,
        images: document.querySelectorAll('img').length,
        xss: typeof window.__xss === 'undefined' ? null : window.__xss,
        text: document.body ? document.body.innerText : '',
        ready: document.readyState,
        svgs: document.querySelectorAll('svg').length,
      };
    })()"""
    deadline = time.monotonic() + 30
    state = evaluate(state_js)
    while time.monotonic() < deadline:
        state = evaluate(state_js)
        if state and state["ready"] == "complete" and state["mounted"] == state["components"]:
            break
        time.sleep(0.1)
    browser.pump(1.0)  # let canvases draw and late errors arrive
    state = evaluate(state_js)
    title = evaluate("document.title")
    shot = browser.send(
        "Page.captureScreenshot",
        {"format": "png", "clip": {"x": 0, "y": 0, "width": 1280, "height": 1600, "scale": 0.5}},
        session,
    )
    rects = evaluate(
        "Array.from(document.querySelectorAll('.icl-lens-cv')).map(e => {"
        "const r = e.getBoundingClientRect();"
        "return {x: r.x + window.scrollX, y: r.y + window.scrollY, w: r.width, h: r.height}; })"
    )
    component_shots = []
    for r in rects:
        if r["w"] < 1 or r["h"] < 1:
            component_shots.append(None)
            continue
        clip = {"x": r["x"], "y": r["y"], "width": r["w"], "height": min(r["h"], 600), "scale": 0.5}
        data = browser.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
            session,
        )
        component_shots.append(base64.b64decode(data["data"]))
    errors, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args"))[:500])
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", "")[:500])
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    browser.send("Target.closeTarget", {"targetId": target})
    return PageResult(
        title, state, errors, requests, base64.b64decode(shot["data"]), component_shots
    )


def _png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of
    pixel bytes."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        previous = line
    pixels = [bytes(r[i : i + 3]) for r in rows for i in range(0, stride, bpp)]
    return width, height, pixels


def _assert_not_blank(png: bytes, what: str, *, min_colours: int = 8, min_ink: float = 0.01):
    width, height, pixels = _png_pixels(png)
    colours = set(pixels)
    ink = sum(1 for p in pixels if min(p) < 235) / len(pixels)
    assert len(colours) >= min_colours and ink >= min_ink, (
        f"{what} looks blank: {len(colours)} colours, {ink:.1%} non-white pixels ({width}x{height})"
    )


@pytest.fixture(scope="module")
def browser():
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    b = Chromium(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(run_dir, model, evil_prompt, label_ids, tmp_path_factory):
    """The report and every view saved on its own, all built from payload tokens."""
    out = tmp_path_factory.mktemp("pages")
    dec = il.decompose(model, evil_prompt, label_tokens=label_ids)
    views = {
        "meta_gradient_view": (dec.view_meta_gradients(layer=1, head=0), ["ColoredTokensMulti"]),
        "meta_gradient_views": (viz.meta_gradient_views(dec, k=2), ["ColoredTokensMulti"] * 2),
        "attention_comparison": (
            viz.attention_comparison(model, evil_prompt, layer=1, ft_model=model).view(),
            ["AttentionHeads"],
        ),
        "overview_view": (viz.overview_view(dec.to_frame(), _metrics_frame()), []),
    }
    paths = {
        name: (view.save(out / f"{name}.html"), names) for name, (view, names) in views.items()
    }
    report_names = ["ColoredTokensMulti", "ColoredTokensMulti", "AttentionHeads"]
    paths["report"] = (run_dir / "report.html", report_names)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [
        "report",
        "meta_gradient_view",
        "meta_gradient_views",
        "attention_comparison",
        "overview_view",
    ],
)
def test_page_in_headless_chromium(browser, pages, page):
    path, expected = pages[page]
    result = _load_page(browser, path)
    state = result.state
    # circuitsvis components mounted (React rendered into every placeholder)
    assert state["names"] == expected
    assert state["mounted"] == state["components"] == len(expected), state
    if "AttentionHeads" in expected:
        assert state["canvases"] > 0
    if page in ("report", "overview_view"):
        assert state["svgs"] >= 3
    # no console errors, no exceptions, nothing fetched but the file itself
    assert result.errors == []
    assert [u for u in result.requests if not u.startswith(("file:", "data:", "blob:"))] == []
    # the payloads stayed text: no script ran, no element was injected
    assert state["xss"] is None and result.title != "pwned"
    assert state["scripts"] == (1 if expected else 0) and state["images"] == 0
    text = state["text"].replace("\xa0", " ")  # circuitsvis writes spaces as &nbsp;
    if "ColoredTokensMulti" in expected:  # AttentionHeads draws its tokens on a canvas
        assert PAYLOAD_SCRIPT in text and PAYLOAD_IMG in text and PAYLOAD_TIGHT in text
    if page == "report":
        assert PAYLOAD_IMG in text  # the task name and the example query
    # the page and every component have something drawn
    _assert_not_blank(result.screenshot, f"{page} screenshot")
    for name, shot in zip(expected, result.component_shots, strict=True):
        assert shot is not None, f"{page}: {name} has no size"
        _assert_not_blank(shot, f"{page}: {name}", min_colours=4, min_ink=0.005)


@pytest.mark.slow
def test_the_browser_check_catches_an_unescaped_token(browser, dec, monkeypatch, tmp_path):
    """Negative control: with circuitsvis given raw token strings (no escaping) the
    whitespace-free payload does run, so the checks above have teeth."""
    tokens = list(dec.prompt.str_tokens)
    tokens[2] = PAYLOAD_TIGHT
    evil = dataclasses.replace(
        dec, prompt=dataclasses.replace(dec.prompt, str_tokens=tuple(tokens))
    )
    monkeypatch.setattr(viz, "_token_props", list)
    path = viz.meta_gradient_view(evil, 1, 0).save(tmp_path / "unescaped.html")
    result = _load_page(browser, path)
    assert result.state["xss"] == 3 and result.state["images"] == 1


def test_report_from_a_comparison(tmp_path, run_dir):
    comparison = pytest.importorskip("icl_lens.study.comparison")
    cmp = comparison.Comparison(
        accuracy={"zsl": 0.5, "icl": 0.75, "ft": 0.625},
        frame=_metrics_frame(),
        config={"task_name": "unit", "shots": 3, "seed": 1},
    )
    path = write_report(cmp, tmp_path / "cmp.html", views=ViewData.load(run_dir))
    page = path.read_text()
    assert "icl-lens report: unit" in page and page.count('class="icl-lens-cv"') == 3
    with pytest.raises(ValueError, match="give a path"):
        write_report(cmp)
