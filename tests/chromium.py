"""Headless Chromium driven over the DevTools pipe (no websocket, no extra package), and
a PNG decoder to tell a drawn screenshot from a blank one: what the browser tests of the
views and the report use."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

# headless, an empty profile's defaults and networking off (nothing listens on port 9);
# Chromium's connections are refused here many at a time without these
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
]


def find_chromium() -> str | None:
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
            *HEADLESS,
            "--disable-extensions",
            f"--user-data-dir={self.profile}",
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


def load_page(browser: Chromium, path: Path) -> PageResult:
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
        // tables wider than the window or their container (cut off or scrolling)
        overflowing_tables: Array.from(document.querySelectorAll('table')).filter(t =>
          t.getBoundingClientRect().right > document.documentElement.clientWidth + 1 ||
          t.parentElement.scrollWidth > t.parentElement.clientWidth + 1).length,
        page_overflows: document.documentElement.scrollWidth >
          document.documentElement.clientWidth + 1,
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


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
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


def assert_not_blank(png: bytes, what: str, *, min_colours: int = 8, min_ink: float = 0.01):
    width, height, pixels = png_pixels(png)
    colours = set(pixels)
    ink = sum(1 for p in pixels if min(p) < 235) / len(pixels)
    assert len(colours) >= min_colours and ink >= min_ink, (
        f"{what} looks blank: {len(colours)} colours, {ink:.1%} non-white pixels ({width}x{height})"
    )
