"""``icl-lens bench --sweep-cells N``: what a sweep saves over separate runs.

The same N cells (seeds 1..N of one model and task: the bench's random-init GPT-2 saved
to disk, its SST-2-like task file, the short learning-rate grid) run two ways, each from
a fresh shell command as a user would:

- (s) ``icl-lens sweep GRID --executor local --max-parallel 1``: one driver process and
  one worker process, which loads the model once and runs the N cells;
- (r) N ``icl-lens run`` processes one after another, each importing the libraries and
  loading the model again.

Wall-clock seconds of each, in alternating order for ``cfg.repeat`` rounds, the fastest
counting; ``sweep_ratio`` = s / r; ``cell_s``: a cell's mean seconds inside the worker
(its compute: no imports, no model load). The cells' results.json files must be
identical both ways (``same_results``).

>>> r = sweep_vs_runs(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2,
...                               n_queries=3, repeat=1), n_cells=2)   # doctest: +SKIP
>>> r["sweep_ratio"] < 1                                                # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icl_lens.bench.workload import BenchConfig, build_hf_model, write_task_file

__all__ = ["sweep_vs_runs"]


def _grid_toml(model: Path, task: Path, cfg: BenchConfig, n_cells: int) -> str:
    run = {
        "model": str(model),
        "task": str(task),
        "shots": cfg.k,
        "lr_grid": cfg.lr_grid,
        "max_queries": cfg.n_queries,
        "batch_size": cfg.batch_size,
        "control": cfg.control,
    }
    lines = ["[run]", *(f"{k} = {json.dumps(v)}" for k, v in run.items())]
    lines += ["[grid]", f"seed = {json.dumps(list(range(1, n_cells + 1)))}"]
    return "\n".join(lines) + "\n"


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-4000:]}")
    return seconds


def sweep_vs_runs(cfg: BenchConfig, *, n_cells: int = 4, log=None) -> dict:
    """Time (s) the sweep and (r) the separate runs of ``n_cells`` cells; see the module
    docstring."""
    cfg.check()
    if n_cells < 1:
        raise ValueError("--sweep-cells must be >= 1")
    log = log or (lambda s: None)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if cfg.threads:
        env.update(OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads))
    icl_lens = [sys.executable, "-m", "icl_lens.cli.main"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="icl-lens-bench-sweep-") as tmp:
        root = Path(tmp)
        hf, tokenizer = build_hf_model(cfg)
        hf.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        task = write_task_file(cfg, root)
        grid = root / "grid.toml"
        grid.write_text(_grid_toml(root / "model", task, cfg, n_cells))

        def run_sweep(out: Path) -> float:
            cmd = [*icl_lens, "sweep", str(grid), "--out", str(out), "--executor", "local"]
            return _timed([*cmd, "--max-parallel", "1", "--quiet"], env)

        def run_each(out: Path) -> float:
            total = 0.0
            for seed in range(1, n_cells + 1):
                args = ["run", "--model", str(root / "model"), "--task", str(task)]
                args += ["--shots", str(cfg.k), "--seed", str(seed), "--lr-grid", cfg.lr_grid]
                args += ["--max-queries", str(cfg.n_queries), "--batch-size", str(cfg.batch_size)]
                args += ["--out", str(out / f"seed-{seed}"), "--quiet"]
                args += [] if cfg.control else ["--no-control"]
                total += _timed([*icl_lens, *args], env)
            return total

        times: dict[str, list[float]] = {"sweep": [], "runs": []}
        for r in range(cfg.repeat):
            order = ("sweep", "runs") if r % 2 == 0 else ("runs", "sweep")
            for mode in order:
                out = root / f"{mode}-{r}"
                log(f"round {r + 1}/{cfg.repeat}: {mode} of {n_cells} cells ...")
                times[mode].append((run_sweep if mode == "sweep" else run_each)(out))
        same = _same_results(root / "sweep-0", root / "runs-0", n_cells)
        cell_s = _cell_seconds(root / f"sweep-{cfg.repeat - 1}")
        shutil.rmtree(root / "model")
    best = {m: min(t) for m, t in times.items()}
    return {
        "n_cells": n_cells,
        "sweep_s": round(best["sweep"], 2),
        "runs_s": round(best["runs"], 2),
        "all_sweep_s": [round(t, 2) for t in times["sweep"]],
        "all_runs_s": [round(t, 2) for t in times["runs"]],
        "sweep_ratio": round(best["sweep"] / best["runs"], 3),
        "cell_s": cell_s,
        "same_results": same,
        "load": (load_before, os.getloadavg()[0]),
    }


def _cell_seconds(sweep_dir: Path) -> float:
    """The mean seconds a cell took inside the worker (its compute, no imports or load)."""
    spans = [json.loads(p.read_text()) for p in sweep_dir.glob("cells/*/sweep-cell.json")]
    return round(sum(s["finished"] - s["started"] for s in spans) / max(1, len(spans)), 2)


def _same_results(sweep_dir: Path, runs_dir: Path, n_cells: int) -> bool:
    """Every cell's results.json equal between the sweep and the separate runs."""
    cells = {}
    for status in sweep_dir.glob("cells/*/sweep-cell.json"):
        seed = json.loads(status.read_text())["grid"]["seed"]
        cells[seed] = json.loads((status.parent / "results.json").read_text())
    runs = {
        s: json.loads((runs_dir / f"seed-{s}" / "results.json").read_text())
        for s in range(1, n_cells + 1)
    }
    return len(cells) == n_cells and all(cells[s] == runs[s] for s in runs)
