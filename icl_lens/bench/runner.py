"""Measure the ``icl-lens bench`` modes: time in interleaved pairs, memory alone.

Time: the modes that are compared with each other (``naive``/``capture``/``floor``,
``ft``/``ft_floor``, ``pipeline``/``pipeline_floor``, the ``scan_*`` modes) run in one
fresh process, in alternating order (``capture, floor``, then ``floor, capture``, ...)
for ``cfg.repeat`` rounds; a mode's time is its fastest round. A shared virtual machine
drifts in speed by tens of percent over minutes; timing a mode and its floor side by
side makes the drift hit both alike, where timing each in its own process minutes apart
did not (a floor measured 12.7 s there and 8.1 s here, with the same code). (a) runs
once.

Memory: each mode runs once, alone in a fresh process, with the high-water mark of its
resident memory reset just before it (``/proc/self/clear_refs``) and read after it
(``VmHWM``); working memory is that peak minus the resident size at the start (the
model, data and libraries). glibc is told to return every freed block of 128 kB or more
at once (``MALLOC_MMAP_THRESHOLD_``): otherwise the peak follows what the allocator keeps
from earlier forwards, and the same capture run measured 340 to 700 MB working against
the floor's 200 MB; with it, the peak follows the tensors alive (215 vs 202 MB, the same
in every run). (a)'s memory run is its first 4 prompts (the peak is one prompt's cache).
Where ``clear_refs`` is not writable, the fallback is ``ru_maxrss`` (said in the output).

>>> r = bench(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2,
...                       n_queries=3, repeat=1), in_process=True)
>>> r.summary()["max_abs_diff"] <= 1e-4
True
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from icl_lens.bench.modes import BASE_MODES, MODES, Workload, run_once
from icl_lens.bench.scan import SCAN_FORMS, SCAN_MODES
from icl_lens.bench.workload import BenchConfig

__all__ = ["BASE_MODES", "MODES", "SCAN_MODES", "BenchConfig", "BenchResult", "bench", "sweep"]

GROUPS = (
    ("naive", "capture", "floor"),
    ("ft", "ft_floor"),
    ("pipeline", "pipeline_floor"),
    SCAN_MODES,
)
"""Modes timed side by side, in one process."""
NAIVE_MEMORY_PROMPTS = 4
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ---- measuring, in this process ---------------------------------------------------


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))


class _Memory:
    """Peak resident memory of a section: the kernel's high-water mark, reset at the
    start where the kernel allows it."""

    def __enter__(self):
        gc.collect()
        self.method = "VmHWM after clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start_kb = _status_kb("VmRSS")
        except OSError:
            self.method = "ru_maxrss"
            self.start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method == "ru_maxrss":
            self.peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            self.peak_kb = _status_kb("VmHWM")
        self.working_kb = max(0, self.peak_kb - self.start_kb)


def _set_threads(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def time_modes(modes: Sequence[str], cfg: BenchConfig, out_dir: Path) -> dict[str, list[dict]]:
    """Every run of ``modes`` (one group) in this process: (a) once, the others in
    alternating order for ``cfg.repeat`` rounds. (a)'s and (b)'s first recorded values
    are saved in ``out_dir`` for :func:`_max_abs_diff`."""
    _set_threads(cfg)
    w = Workload.load(cfg, modes)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    rounds = [m for m in modes if m != "naive"]
    order = (["naive"] if "naive" in modes else []) + [
        m for r in range(cfg.repeat) for m in (rounds if r % 2 == 0 else rounds[::-1])
    ]
    for mode in order:
        one = run_once(mode, w, out_dir)
        one["threads"] = torch.get_num_threads()
        values = one.pop("values", None)
        if values is not None and not runs[mode]:
            torch.save(values, out_dir / f"{mode}.pt")
        runs[mode].append(one)
    return runs


def memory_of(mode: str, cfg: BenchConfig, out_dir: Path) -> dict:
    """Peak and working resident memory of one run of ``mode`` (meant for a fresh
    process started with :data:`MEMORY_ENV`)."""
    _set_threads(cfg)
    w = Workload.load(cfg, [mode])  # a training copy is resident before the section
    with _Memory() as mem:
        run_once(mode, w, out_dir, naive_prompts=NAIVE_MEMORY_PROMPTS)
    return {
        "peak_kb": mem.peak_kb,
        "start_kb": mem.start_kb,
        "working_kb": mem.working_kb,
        "memory": mem.method,
    }


def _abs_diff(x: Tensor, y: Tensor) -> float:
    """Largest difference; scores masked (-inf) in one and not the other count as inf."""
    x_masked, y_masked = torch.isneginf(x), torch.isneginf(y)
    if not torch.equal(x_masked, y_masked):
        return float("inf")
    return float((x.masked_fill(x_masked, 0) - y.masked_fill(y_masked, 0)).abs().max())


def _max_abs_diff(a: dict, b: dict) -> tuple[float, dict]:
    """Over the queries (a) ran (all, or its sample)."""
    per = {}
    n = len(a["attn_out"])
    for key in ("attn_out", "q", "demo_scores", "class_scores"):
        per[key] = _abs_diff(a[key], b[key][:n])
    per["query_scores"] = max(
        _abs_diff(x, y) for x, y in zip(a["query_scores"], b["query_scores"][:n], strict=True)
    )
    return max(per.values()), per


# ---- the benchmark ------------------------------------------------------------------


@dataclass
class BenchResult:
    """Measurements of every mode run, and the headline ratios."""

    config: BenchConfig
    modes: dict[str, dict]
    max_abs_diff: float | None = None
    diff_by_value: dict[str, float] = field(default_factory=dict)
    load: tuple[float, float] = (float("nan"), float("nan"))  # 1-min load before, after
    scan_check: float | None = None
    """max |Transplant({h}, softmax) - Restore({h})| over the scans' logits (an identity:
    the transplant's wiring), when both scans ran."""

    def _ratio(self, a: str, b: str, key: str = "seconds") -> float | None:
        if a in self.modes and b in self.modes:
            den = self.modes[b][key]
            return self.modes[a][key] / den if den else float("inf")
        return None

    def summary(self) -> dict:
        out = {
            "speedup_vs_naive": self._ratio("naive", "capture"),
            "ratio_to_floor": self._ratio("capture", "floor"),
            "max_abs_diff": self.max_abs_diff,
            "peak_mem_ratio": self._ratio("capture", "floor", "working_kb"),
        }
        if "ft" in self.modes and "ft_floor" in self.modes:
            out["ft_ratio"] = self._ratio("ft", "ft_floor")
            ft = self.modes["ft"]
            out["ft_step_ratio"] = (ft["seconds"] - ft["copy_seconds"]) / self.modes["ft_floor"][
                "seconds"
            ]
        if "pipeline" in self.modes and "pipeline_floor" in self.modes:
            out["pipeline_ratio"] = self._ratio("pipeline", "pipeline_floor")
        for form in SCAN_FORMS:
            ratio = self._ratio(f"scan_{form}", "scan_floor")
            if ratio is not None:
                out[f"scan_{form}_ratio"] = ratio
        if self.scan_check is not None:
            out["scan_check"] = self.scan_check
        exact = ("max_abs_diff", "scan_check")
        return {k: (v if v is None or k in exact else round(v, 3)) for k, v in out.items()}


def _child(kind: str, modes: Sequence[str], cfg: BenchConfig, out_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if kind == "memory":
        env.update(MEMORY_ENV)
    if cfg.threads:
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    config = json.dumps(asdict(cfg))
    cmd = [
        sys.executable,
        "-m",
        "icl_lens.bench.runner",
        kind,
        ",".join(modes),
        config,
        str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench {kind} of {list(modes)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict], memory: dict) -> dict:
    """One mode: its fastest run's numbers (the least disturbed by other work on the
    machine), every run's seconds, and its memory run."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    return {**best, **memory}


def bench(
    cfg: BenchConfig | None = None,
    *,
    modes: Sequence[str] = BASE_MODES,
    in_process: bool = False,
    log=None,
) -> BenchResult:
    """Time ``modes`` in interleaved groups and measure each one's memory alone, each in
    a fresh process (``in_process=True``: all here; memory numbers then mean little),
    and compare (a)'s recorded values with (b)'s.

    >>> r = bench(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2,
    ...                       n_queries=3, repeat=1), in_process=True)
    >>> sorted(r.modes)
    ['capture', 'floor', 'naive']
    """
    cfg = cfg or BenchConfig()
    cfg.check()
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    log = log or (lambda s: None)
    load_before = os.getloadavg()[0]
    groups = [[m for m in g if m in modes] for g in GROUPS]
    with tempfile.TemporaryDirectory(prefix="icl-lens-bench-") as tmp:
        out_dir = Path(tmp)
        memory, runs = {}, {}
        for mode in modes:
            log(f"memory of {mode} ...")
            memory[mode] = (
                memory_of(mode, cfg, out_dir)
                if in_process
                else _child("memory", [mode], cfg, out_dir)
            )
        for group in filter(None, groups):
            log(f"timing {', '.join(group)} ({cfg.repeat} interleaved rounds) ...")
            runs.update(
                time_modes(group, cfg, out_dir)
                if in_process
                else _child("time", group, cfg, out_dir)
            )
        result = BenchResult(cfg, {m: _merge(runs[m], memory[m]) for m in modes})
        result.load = (load_before, os.getloadavg()[0])
        if "naive" in modes and "capture" in modes:
            a = torch.load(out_dir / "naive.pt", weights_only=True)
            b = torch.load(out_dir / "capture.pt", weights_only=True)
            result.max_abs_diff, result.diff_by_value = _max_abs_diff(a, b)
        if "scan_softmax" in modes and "scan_restore" in modes:
            a = torch.load(out_dir / "scan_softmax.pt", weights_only=True)["logits"]
            b = torch.load(out_dir / "scan_restore.pt", weights_only=True)["logits"]
            result.scan_check = float((a - b).abs().max())
    return result


SWEEPS = {"k": "k", "queries": "n_queries"}


def sweep(cfg: BenchConfig, name: str, values: Sequence[int], log=None) -> list[dict]:
    """(a) (sampled per ``cfg.naive_sample``), (b) and (c) for each value of ``name``
    (``k`` or ``queries``): one row each."""
    if name not in SWEEPS:
        raise ValueError(f"cannot sweep {name!r}: use one of {', '.join(SWEEPS)}")
    rows = []
    for v in values:
        r = bench(replace(cfg, **{SWEEPS[name]: int(v)}), modes=BASE_MODES, log=log)
        s, m = r.summary(), r.modes
        rows.append(
            {
                name: int(v),
                "prefix_tokens": m["capture"]["prefix_tokens"],
                "query_tokens": m["capture"]["query_tokens"],
                "naive_s": m["naive"]["seconds"],
                "capture_s": m["capture"]["seconds"],
                "floor_s": m["floor"]["seconds"],
                "load": r.load,
                **s,
                "path": m["capture"].get("path"),
            }
        )
    return rows


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m icl_lens.bench.runner {time|memory} MODES CONFIG_JSON OUT_DIR``."""
    kind, modes, config, out = argv
    raw = json.loads(config)
    for key in ("demo_len", "query_len", "model"):
        raw[key] = tuple(raw[key])
    cfg = replace(BenchConfig(), **raw)
    import warnings

    warnings.simplefilter("ignore")
    if kind == "time":
        result = time_modes(modes.split(","), cfg, Path(out))
    else:
        result = memory_of(modes, cfg, Path(out))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - the measuring subprocess
    sys.exit(_worker_main(sys.argv[1:]))
