"""``icl-lens run``: the files it writes, resuming after an interruption without redoing
finished stages (and with the same results), and its errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from icl_lens.analyses import FRAME_COLUMNS

import icl_lens.study.pipeline as COMPARE  # noqa: N812 - the stages compare runs
from icl_lens.cli import main
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_hf_model("gpt2").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root / "model", write_task(root / "two_class.jsonl")


def args(files, out, *extra):
    model_dir, task_file = files
    return [
        "run",
        "--model", str(model_dir),
        "--task", str(task_file),
        "--template", TEMPLATE,
        "--shots", "4",
        "--seed", "1",
        "--out", str(out),
        "--lr-grid", "1e300,10",
        "--lr-extend", "0",
        "--max-queries", "10",
        "--quiet",
        *extra,
    ]  # fmt: skip


class Spy:
    """Wrap a function the comparison's stages call and record the calls."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(COMPARE, name)

        def spy(*a, **kw):
            self.calls.append(kw.get("desc", a[2] if len(a) > 2 else None))
            return real(*a, **kw)

        monkeypatch.setattr(COMPARE, name, spy)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(args(files, out)) == 0
    return out


def test_run_writes_results_json_and_metrics_csv(uninterrupted, files, capsys, tmp_path):
    results = json.loads((uninterrupted / "results.json").read_text())
    assert set(results["accuracy"]) == {"zsl", "icl", "ft"}
    for metric in ("rec2ftp", "simaou", "simam", "kendall"):
        entry = results["metrics"][metric]
        assert isinstance(entry["value"], float) and entry["baselines"]
        assert {"untrained_weights", "icl_retest", "ft_retest"} <= set(entry["baselines"])
    grid = results["lr"]["grid"]
    assert [(g["lr"], g["diverged"]) for g in grid] == [(1e300, True), (10.0, False)]
    assert results["lr"]["selected"] == 10.0
    frame = pd.read_csv(uninterrupted / "metrics.csv")
    assert list(frame.columns) == [*FRAME_COLUMNS, "ft_mode", "flag"]
    assert (uninterrupted / "values.npz").stat().st_size > 0  # for intervals over runs
    assert len(frame) == len(results["table"])

    out = tmp_path / "again"
    capsys.readouterr()
    assert main(args(files, out)) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "simaou" in printed
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert {"untrained", "icl_rt", "ft_rt", "shuf_q", "note"} <= set(header.split())
    assert "lr 10 is the smallest of the grid" in printed  # the run's flag, with its advice
    assert "interval from 10 queries: too few for it to hold" in printed  # --max-queries 10


def test_interrupted_run_resumes_without_redoing_finished_stages(
    uninterrupted, files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"

    real_record = COMPARE.record

    def interrupt(*a, desc="", **kw):  # dies in the FT stage at the selected learning rate
        if desc == "ft":
            raise KeyboardInterrupt
        return real_record(*a, desc=desc, **kw)

    with monkeypatch.context() as m:
        m.setattr(COMPARE, "record", interrupt)
        assert main(args(files, out)) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    done = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert done == sorted(["zsl.pt", "icl.pt", "icl-retest.pt", "lr=1e+300.pt", "lr=10.0.pt"])

    trials, records = Spy(monkeypatch, "run_trial"), Spy(monkeypatch, "record")
    assert main(args(files, out)) == 0
    assert trials.calls == []  # the learning-rate grid was not redone
    control = [f"control-{i}-{s}" for i in range(3) for s in ("zsl", "icl", "ft")]
    assert records.calls == ["ft", "ft-retest", *control]  # FT, its retest, then the control
    assert json.loads((out / "results.json").read_text()) == json.loads(
        (uninterrupted / "results.json").read_text()
    )
    assert (out / "metrics.csv").read_text() == (uninterrupted / "metrics.csv").read_text()

    trials.calls.clear(), records.calls.clear()
    assert main(args(files, out)) == 0  # a finished run: everything loads
    assert trials.calls == records.calls == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-draws", "0"], "--control-draws must be >= 1, got 0"),
        (["--lr-extend", "-1"], "--lr-extend must be >= 0, got -1"),
        (["--lr-holdout", "0"], "--lr-holdout must be >= 1, got 0"),
    ],
)
def test_new_options_are_checked_before_loading(files, tmp_path, capsys, extra, message):
    assert main(args(files, tmp_path / "x", *extra)) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_errors_are_one_clear_line(files, tmp_path, capsys, uninterrupted):
    assert main(args(files, tmp_path / "a", "--shots", "40")) == 2
    err = capsys.readouterr().err
    assert "error: k=40 demonstrations requested" in err and "Traceback" not in err

    hub = args(files, tmp_path / "b", "--data-source", "hub")  # no StaICC fallback
    hub[hub.index("--task") + 1] = "sst2"
    assert main(hub) == 2
    assert "Pass a local file instead" in capsys.readouterr().err

    assert main(args(files, uninterrupted, "--seed", "2")) == 2  # the seed is given twice
    assert "other settings (differing: seed)" in capsys.readouterr().err
