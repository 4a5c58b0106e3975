"""``icl-lens bench`` on a tiny shape: it runs, reports its JSON, and (b) equals (a).

Speed is measured by the benchmark, never asserted here."""

import json

import pytest

from icl_lens.bench.runner import BenchConfig, bench
from icl_lens.cli import main

TINY = ["--layers", "2", "--d-model", "64", "--heads", "4", "--vocab", "300"]
KEYS = {"speedup_vs_naive", "ratio_to_floor", "max_abs_diff", "peak_mem_ratio"}


def test_cli_bench_tiny_prints_json_and_matches_naive(capsys):
    code = main(
        ["bench", *TINY, "-k", "3", "--queries", "5", "--batch-size", "2", "--threads", "1"]
    )
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert KEYS <= set(summary)
    assert summary["max_abs_diff"] <= 1e-4
    assert all(summary[k] > 0 for k in KEYS - {"max_abs_diff"})
    assert "path taken by (b): cache" in out


@pytest.mark.slow
def test_bench_ft_and_pipeline_modes_tiny():
    cfg = BenchConfig(
        n_layers=1,
        d_model=32,
        n_heads=4,
        d_vocab=200,
        k=3,
        n_queries=4,
        lr_grid="1e-3,1e-2",
        repeat=1,
    )
    modes = ("naive", "capture", "ft", "ft_floor", "pipeline", "pipeline_floor")
    result = bench(cfg, modes=modes, in_process=True)
    summary = result.summary()
    assert {"ft_ratio", "ft_step_ratio", "pipeline_ratio"} <= set(summary)
    assert result.modes["ft"]["copy_seconds"] > 0
    assert summary["max_abs_diff"] <= 1e-4
    passes = result.modes["pipeline_floor"]["passes"]
    assert {"zsl", "icl", "ft train", "ft eval", "control ft train"} <= set(passes)


def test_bench_a_model_directory_gemma3_past_its_window(tmp_path):
    """--model: a saved Gemma 3 whose local layers' window (8) is far shorter than the
    prefix; the capture path reuses the prefix cache and records what (a) records, the
    masked scores included."""
    from tests.models import make_hf_model, make_tokenizer

    directory = tmp_path / "gemma3"
    make_hf_model("gemma3", n_ctx=256).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    cfg = BenchConfig(model=(str(directory),), k=3, n_queries=5, batch_size=2, repeat=1)
    result = bench(cfg, modes=("naive", "capture", "floor"), in_process=True)
    assert result.modes["capture"]["path"] == "cache"
    assert result.modes["capture"]["prefix_tokens"] > 8 * 5
    assert result.summary()["max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="no such file or directory"):
        bench(BenchConfig(model=(str(tmp_path / "nothing"),)), in_process=True)


def test_bench_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="multiple of heads"):
        bench(BenchConfig(d_model=30, n_heads=4), in_process=True)
    with pytest.raises(ValueError, match="unknown modes"):
        bench(BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100), modes=["fast"])


def test_a_mode_and_its_floor_are_timed_in_alternating_rounds(monkeypatch, tmp_path):
    import icl_lens.bench.runner as bench_module

    order = []

    def fake_run_once(mode, w, directory, **kwargs):
        order.append(mode)
        return {"mode": mode, "seconds": 1.0}

    monkeypatch.setattr(bench_module, "run_once", fake_run_once)
    cfg = BenchConfig(n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2, n_queries=3, repeat=3)
    runs = bench_module.time_modes(["naive", "capture", "floor"], cfg, tmp_path)
    assert order == ["naive", "capture", "floor", "floor", "capture", "capture", "floor"]
    assert [len(runs[m]) for m in ("naive", "capture", "floor")] == [1, 3, 3]


@pytest.mark.slow
def test_bench_sweep_mode_tiny():
    """The sweep mode runs both ways and the cells' results are identical; its ratio is
    the benchmark's to report (docs/performance.md), not this test's."""
    from icl_lens.bench.sweep_cost import sweep_vs_runs

    cfg = BenchConfig(
        n_layers=1, d_model=32, n_heads=4, d_vocab=100, k=2, n_queries=3, repeat=1, threads=1
    )
    result = sweep_vs_runs(cfg, n_cells=1)
    assert result["same_results"] is True
    assert result["sweep_s"] > 0 and result["runs_s"] > 0 and result["sweep_ratio"] > 0


def test_scan_modes_run_every_head_on_the_cache_against_as_many_bare_passes(monkeypatch):
    """--scan: each form runs n_layers x n_heads interventions per query on the cached
    prefix; its floor as many bare passes, in the same batches; Transplant({h}, softmax)
    equals Restore({h}) over the scans' logits."""
    import icl_lens.bench.modes as modes_module
    from icl_lens.bench.scan import SCAN_MODES, scan_interventions

    rows = []
    real = modes_module.bare_queries

    def counting(model, prefix, queries, batch_size):
        rows.append([len(q) for q in queries])
        return real(model, prefix, queries, batch_size)

    monkeypatch.setattr(modes_module, "bare_queries", counting)
    cfg = BenchConfig(
        n_layers=2, d_model=32, n_heads=4, d_vocab=100, k=2, n_queries=3, batch_size=5, repeat=1
    )
    result = bench(cfg, modes=SCAN_MODES, in_process=True)
    summary = result.summary()
    for form in ("knockout", "restore", "linear", "fitted", "softmax"):
        assert summary[f"scan_{form}_ratio"] > 0
        assert result.modes[f"scan_{form}"]["path"] == "cache"
        assert result.modes[f"scan_{form}"]["interventions"] == 3 * 2 * 4
    assert result.modes["scan_floor"]["interventions"] == 3 * 2 * 4
    assert summary["scan_check"] <= 1e-4
    # the floor: each query once per head, query-major (timing run and memory run)
    _, queries, _ = modes_module.synthetic_icl(cfg)
    assert rows[0] == [len(q) for q in queries for _ in range(8)] == rows[1]
    with pytest.raises(ValueError, match="unknown scan form 'half'"):
        scan_interventions(None, "half")


def test_cli_scan_alias_toy_and_conflicts(monkeypatch, capsys):
    import icl_lens.cli.bench as cli_bench

    seen = {}

    def fake_bench(cfg, *, modes, in_process, log):
        seen.update(cfg=cfg, modes=list(modes))
        raise ValueError("stop here")

    monkeypatch.setattr(cli_bench, "bench", fake_bench)
    assert main(["bench", "--toy", "--only", "scan,floor"]) == 2
    assert seen["modes"][-1] == "floor" and seen["modes"][0] == "scan_knockout"
    assert len(seen["modes"]) == 7 and seen["cfg"].model[0].endswith("checkpoint")
    assert main(["bench", "--scan", "--skip-naive"]) == 2
    assert seen["modes"][:2] == ["capture", "floor"] and "scan_floor" in seen["modes"]
    assert main(["bench", "--toy", "--model", "x"]) == 2
    assert "give --toy or --model, not both" in capsys.readouterr().err
