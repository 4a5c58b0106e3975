"""Smoke test of the momentum training comparison (icl_lens.momentum_study.study, issue 7 part 2).

A few steps on a tiny config for vanilla and learned momentum, through ``run_study`` (the
code path of ``icl-lens momentum``): finite losses, gradients reach the learned eta, the
learned eta moves, the outputs have the expected keys. Runs in a few seconds.
"""

from __future__ import annotations

import csv
import doctest
import json
import math

import torch

import icl_lens.cli.momentum as cli_momentum
import icl_lens.momentum_study.config as config
import icl_lens.momentum_study.figure as figure
import icl_lens.momentum_study.outputs as outputs
import icl_lens.momentum_study.study as study
import icl_lens.momentum_study.train as train
from icl_lens.cli import SUBCOMMANDS, main
from icl_lens.momentum_study.config import StudyConfig
from icl_lens.momentum_study.study import run_study

torch.set_num_threads(1)

TINY = StudyConfig(
    variants=("vanilla", "learned"),
    seeds=(0,),
    steps=3,
    batch_size=4,
    n_layer=2,
    n_embd=16,
    n_head=2,
    warmup_steps=1,
    eval_sequences=4,
    eval_instances=1,
    eval_queries=2,
    log_every=1,
)


def test_smoke_vanilla_and_learned(tmp_path):
    results = run_study(TINY, tmp_path, jobs=1, log=None)
    assert set(results) >= {"config", "runs", "summary", "missing", "meta"}
    assert results["missing"] == []
    runs = {r["variant"]: r for r in results["runs"]}
    assert set(runs) == {"vanilla", "learned"}
    for run in runs.values():
        assert set(run) >= {
            "variant", "seed", "eta", "learnable", "final_eta", "grad_check", "history",
            "val_loss", "val_ppl", "val_label_loss", "icl", "train_s", "eval_s",
        }  # fmt: skip
        assert all(math.isfinite(row["loss"]) for row in run["history"])
        assert len(run["history"]) == TINY.steps
        assert math.isfinite(run["val_ppl"]) and run["val_ppl"] > 1
        assert set(run["icl"]) == {"overall", "canonical", "arbitrary"}
        for group in run["icl"].values():
            assert set(group) == {"0", "4", "16"}
            assert all(0 <= acc <= 100 for acc in group.values())
        check = run["grad_check"]
        assert check["model_params_with_grad"] > 0
        assert all(".attn.qkv." in name for name in check["model_params_without_grad"])
    # identical budgets: same training config (seed, data order, optimizer settings)
    assert runs["vanilla"]["train_config"] == runs["learned"]["train_config"]
    learned = runs["learned"]
    assert learned["grad_check"]["momentum_params"] == TINY.n_layer
    assert learned["grad_check"]["momentum_params_with_grad"] == TINY.n_layer
    eta = torch.tensor(learned["final_eta"])
    assert eta.shape == (TINY.n_layer, TINY.n_head)
    assert (eta - TINY.learned_eta_init).abs().max() > 1e-4  # the learned eta changed
    assert runs["vanilla"]["final_eta"] is None

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["summary"]) == {"vanilla", "learned"}
    entry = on_disk["summary"]["learned"]
    assert set(entry["val_ppl"]) == {"n", "mean", "std", "min", "max"}
    assert {"icl_overall_k16", "icl_arbitrary_k0", "icl_canonical_k4", "eta_mean"} <= set(entry)
    assert "diff_vs_vanilla" in entry
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"vanilla", "learned"}
    assert {"val_ppl", "icl_overall_k0", "icl_arbitrary_k16"} <= {r["metric"] for r in rows}
    svg = (tmp_path / "momentum.svg").read_text()
    assert svg.startswith("<?xml") and svg.rstrip().endswith("</svg>") and "<script" not in svg
    assert "vanilla" in svg and "learned" in svg  # matplotlib, text kept as text

    # resume: a second call trains nothing and reproduces the summary
    again = run_study(TINY, tmp_path, jobs=1, log=None)
    assert again["meta"]["runs_trained"] == 0 and again["meta"]["runs_reused"] == 2
    assert again["summary"] == on_disk["summary"]


def test_cli_registered_and_parses(tmp_path):
    assert SUBCOMMANDS["momentum"] == "icl_lens.cli.momentum"
    assert main(["momentum", "--out", str(tmp_path), "--variants", "bogus"]) == 2


def test_doctests():
    for module in (config, train, study, outputs, figure, cli_momentum):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
