"""``icl-lens bench``: what the demonstrations cost, measured offline.

    icl-lens bench                      # k=32, 64 queries, GPT-2-small shape, random init
    icl-lens bench --ft                 # + the FT step against a bare forward + backward
    icl-lens bench --pipeline           # + ``compare`` against its unavoidable passes
    icl-lens bench --sweep k=4,8,16,32,64 --naive-sample 4    # a scaling table
    icl-lens bench --layers 2 --d-model 64 --heads 4 --vocab 500 -k 4 --queries 8
    icl-lens bench --sweep-cells 4      # an icl-lens sweep of 4 cells vs 4 icl-lens runs
    icl-lens bench --model $(python -m icl_lens.model.wheels) -k 16   # a real model
    icl-lens bench --toy --only scan -k 8 --queries 32   # the per-head scans, toy model

The model is a random-init GPT-2 (``transformers.GPT2Config``, default 12 layers,
d_model 768, 12 heads, vocabulary 50257) loaded like any other model
(:func:`icl_lens.load_model`); demonstrations and queries are random token ids of
SST-2-like lengths (a demonstration 25-30 tokens, a query 20-30), seeded. ``--model``
benchmarks a local real model instead: a Hugging Face directory, a ``.gguf`` file, or
GGUF chunk files in order, as ``icl-lens run --model`` takes them (float32; prompts are
random ids from its vocabulary after its BOS); ``--toy`` the embedded toy model.

The modes:

- (a) ``naive``: every query's full ICL prompt (BOS + demonstrations + query), one at a
  time, through the model's own ``run_with_cache`` (every hook cached); the recorded
  quantities read from that cache. It runs once; its time is its fastest prompt's
  seconds per token times every prompt's tokens, which favours (a).
- (b) ``capture``: icl-lens's capture path, :func:`icl_lens.study.records.record` exactly as
  :func:`icl_lens.study.compare` runs it (prefix run once and its key/value cache reused,
  right-padded query batches, only attn_out, scores and q hooked at the recorded
  position, logits at the prediction position, the first prompt checked against a
  full forward).
- (c) ``floor``: the same prefix pass and the same cached query batches with no capture
  hooks at all; logits at the prediction position only, no check. Nothing a comparison
  needs can cost less on this model code.
- ``--ft``: (d) :func:`icl_lens.study.finetune.finetune` (record_queries=True, as the chosen
  learning rate's run in ``compare``; its model copy included) against (e) its floor:
  on a copy made before the clock starts, per demonstration a bare forward, the mean
  next-token loss, a backward with only the key/value projections requiring grad, the
  SGD update.
- ``--pipeline``: (f) ``compare`` (``icl-lens run``'s engine) on a synthetic local task
  file (SST-2 template, random words) with the short learning-rate grid, against (g)
  its unavoidable passes run bare: ZSL and ICL recording forwards, per learning rate
  the FT training (as in (e)) and the FT evaluation forward, and with the
  untrained-weights control (default, as ``icl-lens run``) its four too. (f) also
  prints where its time went.

How it measures (:mod:`icl_lens.bench.runner`): a mode and its floor are timed side by side in
one fresh process, in alternating order for ``--repeat`` rounds, and a mode's time is
its fastest round; each mode's memory is measured alone in another fresh process, as its
peak resident memory minus the resident size before it (the model and libraries).

``max_abs_diff`` is the largest absolute difference between (a)'s and (b)'s recorded
values: attention outputs, query vectors, the query-side score rows, the demonstration
scores (summed over heads) and the class scores.

- ``--scan``: the interventions study's per-head scans (:mod:`icl_lens.bench.scan`):
  per query, one intervention per head (``n_layers x n_heads``), batched, on the
  cached prefix: (h) Knockout({h}), (i) Restore({h}), (j) Transplant({h}, linear),
  (k) Transplant({h}, fitted), (l) Transplant({h}, softmax), each against (m) its
  floor: the same number of bare query passes on the cached prefix, in the same
  batches. ``scan_check`` is max |(l) - (i)| over the logits (an identity).
  ``--only scan`` runs these alone.
- ``--sweep-cells N``: (s) ``icl-lens sweep`` of N cells (seeds 1..N, the bench model
  saved to disk, the synthetic task, the short grid) on one local worker against (r) the
  same N cells as separate ``icl-lens run`` processes, wall-clock, alternating rounds
  (:mod:`icl_lens.bench.sweep_cost`); prints ``sweep_ratio`` (s/r) as its JSON.

The last line printed is JSON: ``speedup_vs_naive`` (a/b), ``ratio_to_floor`` (b/c),
``max_abs_diff``, ``peak_mem_ratio`` (b/c working memory) and, when run, ``ft_ratio``
(d/e), ``ft_step_ratio`` (d without its model copy / e: the per-demonstration steps),
``pipeline_ratio`` (f/g) and ``scan_{form}_ratio`` ((h)..(l) / m) with ``scan_check``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from icl_lens.bench.runner import (
    BASE_MODES,
    NAIVE_MEMORY_PROMPTS,
    SCAN_MODES,
    SWEEPS,
    BenchConfig,
    BenchResult,
    bench,
    sweep,
)

__all__ = ["format_result", "format_sweep", "main", "register"]


def _mb(kb: float) -> str:
    return f"{kb / 1024:.0f} MB"


def format_result(r: BenchResult) -> str:
    c, m = r.config, r.modes
    any_mode = next(iter(m.values()))
    shape = (
        " ".join(c.model)
        if c.model
        else f"random-init GPT-2, {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
        f"vocab {c.d_vocab}, context {c.context}"
    )
    lines = [
        f"model: {shape}; torch {torch.__version__}, "
        f"{any_mode['threads']} threads, {os.cpu_count()} CPUs; load average (1 min) "
        f"{r.load[0]:.2f} before, {r.load[1]:.2f} after",
        f"workload: k={c.k} demonstrations ({any_mode['prefix_tokens']} prefix tokens with "
        f"BOS), {c.n_queries} queries ({any_mode['query_tokens']} tokens), batch {c.batch_size}",
        "",
        f"{'mode':<44}{'seconds':>9}{'CPU s':>9}{'peak RSS':>11}{'working':>10}   runs (s)",
    ]
    names = {
        "naive": "(a) naive: run_with_cache per full prompt",
        "capture": "(b) icl-lens capture (record)",
        "floor": "(c) floor: prefix once + bare query batches",
        "ft": "(d) finetune, record_queries",
        "ft_floor": "(e) floor: bare fwd + bwd over K/V",
        "pipeline": "(f) compare (icl-lens run)",
        "pipeline_floor": "(g) floor: its unavoidable passes, bare",
        "scan_knockout": "(h) scan: Knockout({h}) per head",
        "scan_restore": "(i) scan: Restore({h}) per head",
        "scan_linear": "(j) scan: Transplant({h}, linear) per head",
        "scan_fitted": "(k) scan: Transplant({h}, fitted) per head",
        "scan_softmax": "(l) scan: Transplant({h}, softmax) per head",
        "scan_floor": "(m) floor: as many bare query passes",
    }
    for mode, res in m.items():
        runs = ", ".join(f"{x:.2f}" for x in res["all_seconds"])
        if mode == "naive":
            runs = f"{res['naive_prompts']} prompts in {res['measured_seconds']:.2f}"
        lines.append(
            f"{names[mode]:<44}{res['seconds']:>9.2f}{res['cpu_seconds']:>9.2f}"
            f"{_mb(res['peak_kb']):>11}{_mb(res['working_kb']):>10}   {runs}"
        )
    lines.append(
        f"seconds: the fastest of {c.repeat} rounds, a mode and its floor alternating in one "
        "process; (a) runs once and counts its fastest prompt's seconds per token times all "
        "prompts' tokens (favours (a))"
    )
    lines.append(
        f"memory: each mode alone in a fresh process, {any_mode['memory']} (glibc returning "
        f"freed blocks >= 128 kB); working = peak - resident before the run; (a) on its first "
        f"{NAIVE_MEMORY_PROMPTS} prompts"
    )
    if "capture" in m:
        lines.append(f"path taken by (b): {m['capture'].get('path')}")
    if r.max_abs_diff is not None:
        per = ", ".join(f"{k} {v:.2e}" for k, v in r.diff_by_value.items())
        lines.append(f"max |a - b| over recorded values: {r.max_abs_diff:.2e} ({per})")
    if "ft" in m and "ft_floor" in m:
        k = max(1, c.k)
        ft = m["ft"]
        lines.append(
            f"FT per demonstration: {(ft['seconds'] - ft['copy_seconds']) / k * 1e3:.0f} ms "
            f"vs floor {m['ft_floor']['seconds'] / k * 1e3:.0f} ms, plus the model copy "
            f"(once per learning rate) {ft['copy_seconds']:.2f} s"
        )
    if "pipeline" in m:
        p = m["pipeline"]
        lines.append(
            f"pipeline: accuracy {p['accuracy']}, lr {p['lr']:g}, k_effective {p['k_effective']}"
        )
        lines.append("  where compare's time went (inclusive seconds, calls):")
        for name, (s, n) in sorted(p["breakdown"].items(), key=lambda kv: -kv[1][0]):
            lines.append(f"    {name:<40}{s:>9.2f}{n:>5}")
    if "pipeline_floor" in m:
        lines.append("  unavoidable passes, bare (seconds):")
        for name, s in m["pipeline_floor"]["passes"].items():
            lines.append(f"    {name:<40}{s:>9.2f}")
    scans = [mode for mode in m if mode.startswith("scan_") and mode != "scan_floor"]
    if scans:
        paths = sorted({m[mode]["path"] for mode in scans})
        lines.append(
            f"scans: {m[scans[0]]['interventions']} (query, head) rows each, batch "
            f"{c.batch_size}; path taken: {', '.join(paths)}"
        )
    if r.scan_check is not None:
        lines.append(
            f"max |softmax transplant - restore| over the scans' logits: {r.scan_check:.2e}"
        )
    s = r.summary()
    lines.append("")
    lines.append(
        "ratios: "
        + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None and k != "max_abs_diff")
    )
    lines.append(json.dumps(s))
    return "\n".join(lines)


def format_sweep(rows: list[dict], name: str, cfg: BenchConfig) -> str:
    """A markdown table of a sweep, then its rows as JSON."""
    head = (
        f"| {name} | prefix tokens | query tokens | (a) naive s | (b) capture s | (c) floor s "
        "| a/b | b/c | mem b/c | max abs diff | load before/after |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r[name]} | {r['prefix_tokens']} | {r['query_tokens']} | {r['naive_s']:.1f} "
            f"| {r['capture_s']:.2f} "
            f"| {r['floor_s']:.2f} | {r['speedup_vs_naive']:.1f} | {r['ratio_to_floor']:.2f} "
            f"| {r['peak_mem_ratio']:.2f} | {r['max_abs_diff']:.1e} "
            f"| {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines.append(
        f"\nseconds: the fastest of {cfg.repeat} interleaved rounds for (b) and (c); (a) its "
        "fastest prompt's seconds per token times all prompts' tokens"
        + (f" (it ran the first {cfg.naive_sample} prompts)" if cfg.naive_sample else "")
    )
    lines.append(json.dumps(rows))
    return "\n".join(lines)


def format_sweep_cost(r: dict, cfg: BenchConfig) -> str:
    """(s) the sweep against (r) the separate runs, then the result as JSON."""
    lines = [
        f"model: random-init GPT-2, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, vocab {cfg.d_vocab}; {r['n_cells']} cells (seeds 1..{r['n_cells']}"
        f"), k={cfg.k}, {cfg.n_queries} queries, lr grid {cfg.lr_grid}, control {cfg.control}; "
        f"load average {r['load'][0]:.2f} before, {r['load'][1]:.2f} after",
        f"(s) icl-lens sweep, one local worker  {r['sweep_s']:>8.2f} s   runs {r['all_sweep_s']}",
        f"(r) {r['n_cells']} icl-lens run processes     {r['runs_s']:>8.2f} s   runs "
        f"{r['all_runs_s']}",
        f"a cell's compute in the worker: {r['cell_s']:.2f} s (mean)",
        f"sweep_ratio (s/r) {r['sweep_ratio']}; results identical: {r['same_results']}",
    ]
    lines.append(json.dumps(r))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument(
        "--model",
        nargs="+",
        default=[],
        help="a local model instead of the random GPT-2: a Hugging Face directory, a .gguf "
        "file, or GGUF chunk files in order",
    )
    p.add_argument(
        "--toy", action="store_true", help="the embedded toy model instead of the random GPT-2"
    )
    p.add_argument("--layers", type=int, default=d.n_layers)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.n_heads)
    p.add_argument("--vocab", type=int, default=d.d_vocab)
    p.add_argument("--n-ctx", type=int, default=0, help="context (default: fits the prompts)")
    p.add_argument("-k", "--shots", type=int, default=d.k, help="demonstrations (default 32)")
    p.add_argument("--queries", type=int, default=d.n_queries, help="queries (default 64)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--repeat",
        type=int,
        default=d.repeat,
        help="interleaved timing rounds of every mode but (a); the fastest counts",
    )
    p.add_argument("--ft", action="store_true", help="also time the FT step against its floor")
    p.add_argument(
        "--pipeline", action="store_true", help="also time compare against its unavoidable passes"
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="also time the interventions' per-head scans against their floor",
    )
    p.add_argument("--lr-grid", default=d.lr_grid, help="grid of --pipeline (default short)")
    p.add_argument("--no-control", action="store_true", help="--pipeline without the control")
    p.add_argument("--skip-naive", action="store_true", help="no (a) (it is the slow one)")
    p.add_argument(
        "--naive-sample",
        type=int,
        default=0,
        help="run (a) on the first N queries only and scale its time by prompt tokens",
    )
    p.add_argument(
        "--sweep",
        default="",
        metavar="NAME=V1,V2,...",
        help="a scaling table of (a), (b), (c): k=4,8,16,32,64 or queries=16,32,64,128",
    )
    p.add_argument(
        "--sweep-cells",
        type=int,
        default=0,
        metavar="N",
        help="time an icl-lens sweep of N cells on one local worker against N icl-lens runs",
    )
    p.add_argument(
        "--only", default="", help="comma-separated modes to run instead ('scan': every scan)"
    )
    p.add_argument("--in-process", action="store_true", help="no subprocesses (memory unusable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def config_from_args(args) -> BenchConfig:
    from icl_lens.errors import UserError

    model = tuple(args.model)
    if args.toy:
        if model:
            raise UserError("give --toy or --model, not both")
        from icl_lens.toy import toy_model_dir

        model = (str(toy_model_dir()),)
    return BenchConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        d_vocab=args.vocab,
        n_ctx=args.n_ctx,
        k=args.shots,
        n_queries=args.queries,
        batch_size=args.batch_size,
        threads=args.threads or torch.get_num_threads(),
        lr_grid=args.lr_grid,
        control=not args.no_control,
        seed=args.seed,
        naive_sample=args.naive_sample,
        repeat=args.repeat,
        model=model,
    )


def modes_from_args(args) -> list[str]:
    if args.only:
        named = [m.strip() for m in args.only.split(",") if m.strip()]
        return [x for m in named for x in (SCAN_MODES if m == "scan" else [m])]
    modes = [m for m in BASE_MODES if not (args.skip_naive and m == "naive")]
    if args.ft:
        modes += ["ft", "ft_floor"]
    if args.pipeline:
        modes += ["pipeline", "pipeline_floor"]
    if args.scan:
        modes += list(SCAN_MODES)
    return modes


def main(args) -> int:
    from icl_lens.errors import UserError

    cfg = config_from_args(args)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        if args.sweep_cells:
            from icl_lens.bench.sweep_cost import sweep_vs_runs

            print(format_sweep_cost(sweep_vs_runs(cfg, n_cells=args.sweep_cells, log=log), cfg))
            return 0
        if args.sweep:
            name, _, values = args.sweep.partition("=")
            if name not in SWEEPS or not values:
                raise ValueError(f"--sweep {args.sweep!r}: use k=4,8,16 or queries=16,32,64")
            rows = sweep(cfg, name, [int(v) for v in values.split(",")], log=log)
            print(format_sweep(rows, name, cfg))
            return 0
        result = bench(cfg, modes=modes_from_args(args), in_process=args.in_process, log=log)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(format_result(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time icl-lens's capture path against run_with_cache and a bare floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=main)
