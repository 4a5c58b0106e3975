"""Vanilla vs momentum attention, trained from scratch on the toy corpus (issue 7, part 2).

Every *run* trains one small GPT-2 (random init) for a fixed number of steps on the toy
task family's training sequences (:class:`icl_lens.toy.train.SequenceMaker`), through a
TransformerLens hooked model (:func:`icl_lens.load_model`) so that momentum attention
(:func:`icl_lens.hooks.momentum.add_momentum`) applies. A run is one *variant* and one *seed*:

- ``vanilla``: no momentum;
- ``eta0.5``, ``eta0.9`` (any ``eta<float>``): fixed ``eta`` on every head of every layer;
- ``learned``: ``eta`` learned per layer and head (``eta = sigmoid(logit)``, initialised
  at :attr:`StudyConfig.learned_eta_init`), trained with the model by the same AdamW and
  schedule, its learning rate scaled by :attr:`StudyConfig.eta_lr_scale` (10: Adam moves
  a logit by about ``lr`` per step, so at the model's rate ``eta`` could barely leave its
  initial value in a short run; set before any result was seen).

The budget is identical across variants for a seed: same initial weights, same batches in
the same order, same optimizer, schedule and number of steps. After training each run is
measured on held-out data (instance seeds below ``10**6``, never trained on):

- validation perplexity: ``exp`` of the mean next-token loss (unweighted) over
  :attr:`StudyConfig.eval_sequences` held-out toy sequences (instance seeds ``500000 + i``);
- ICL accuracy at ``k`` in :attr:`StudyConfig.shots` demonstrations on
  :attr:`StudyConfig.eval_instances` canonical instances (seeds ``600000 + i``) and as
  many arbitrary-pair instances (seeds ``700000 + i``), :attr:`StudyConfig.eval_queries`
  class-balanced queries each; ``overall`` pools both kinds (equal numbers of queries).
  A prediction is the instance's label word with the higher logit after ``Label:``.

:func:`run_study` runs every (variant, seed), in parallel processes with one torch
thread each, saves each run as it finishes (``OUT/runs/*.json``, so an interrupted study
resumes) and writes ``OUT/results.json``, ``OUT/summary.csv`` and ``OUT/momentum.svg``.
The command line is ``icl-lens momentum --out DIR``.

Modules: :mod:`~icl_lens.momentum_study.config` (the study's definition),
:mod:`~icl_lens.momentum_study.train` (one run), this one (every run, resumable),
:mod:`~icl_lens.momentum_study.outputs` (summary, files, tables) and
:mod:`~icl_lens.momentum_study.figure` (the matplotlib figure).

>>> from icl_lens.momentum_study.config import StudyConfig
>>> run_study(StudyConfig(), "runs/momentum", jobs=2)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icl_lens.momentum_study.config import StudyConfig
from icl_lens.momentum_study.outputs import summarise, write_outputs
from icl_lens.momentum_study.train import train_run

__all__ = ["run_study"]


def _run_path(out_dir: Path, variant: str, seed: int) -> Path:
    return out_dir / "runs" / f"{variant}_seed{seed}.json"


def _worker(config_dict: dict[str, Any], variant: str, seed: int, path: str, verbose: bool) -> str:
    """Process-pool entry: one torch thread, train, save atomically; returns the path."""
    import torch

    torch.set_num_threads(1)
    config = StudyConfig.from_dict(config_dict)
    log = (lambda line: print(line, flush=True)) if verbose else None
    run = train_run(config, variant, seed, log=log)
    run["study_config"] = config_dict
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(path)
    return path


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    jobs: int = 2,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train and measure every (variant, seed); write the outputs; return results.json's dict.

    Runs already saved under ``out_dir/runs`` with the same config are reused (resume).
    ``jobs > 1`` trains in that many spawned processes, one torch thread each; ``jobs=1``
    trains in this process (with its current torch thread count).
    """
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    todo, reused = [], 0
    for seed in config.seeds:  # seed-major, so a partial study has whole seeds
        for variant in config.variants:
            path = _run_path(out, variant, seed)
            if path.is_file():
                try:
                    if json.loads(path.read_text()).get("study_config") == cfg:
                        reused += 1
                        continue
                except json.JSONDecodeError:
                    pass
            todo.append((variant, seed, str(path)))
    if log and reused:
        log(f"reusing {reused} finished runs from {out / 'runs'}")
    start = time.time()
    load_start = os.getloadavg()
    if jobs <= 1 or len(todo) <= 1:
        for variant, seed, path in todo:
            if log:
                log(f"training {variant} seed {seed}")
            run = train_run(config, variant, seed, log=log)
            run["study_config"] = cfg
            Path(path).write_text(json.dumps(run, indent=1) + "\n")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(_worker, cfg, v, s, p, log is not None): (v, s) for v, s, p in todo
            }
            for fut in as_completed(futures):
                fut.result()
                if log:
                    v, s = futures[fut]
                    log(f"finished {v} seed {s} ({time.time() - start:.0f} s)")
    wall = time.time() - start
    runs = []
    for seed in config.seeds:
        for variant in config.variants:
            path = _run_path(out, variant, seed)
            if path.is_file():
                runs.append(json.loads(path.read_text()))
    results = {
        "config": cfg,
        "runs": runs,
        "summary": summarise(runs, config),
        "missing": [
            f"{v} seed {s}"
            for s in config.seeds
            for v in config.variants
            if not _run_path(out, v, s).is_file()
        ],
        "meta": {
            "wall_s": round(wall, 1),
            "runs_trained": len(todo),
            "runs_reused": reused,
            "jobs": jobs,
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    write_outputs(results, out)
    return results
