"""`icl-lens demo` end to end on the embedded toy model: the main job of the README."""

import json
import math

import pytest

from icl_lens.cli import main
from icl_lens.toy import toy_model_dir


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_accuracy_ordering(demo_dir):
    acc = json.loads((demo_dir / "results.json").read_text())["accuracy"]
    # the toy model learns in context: ICL well above ZSL, FT above ZSL, ZSL at or above chance
    assert acc["icl"] >= acc["zsl"] + 0.15, acc
    assert acc["ft"] >= acc["zsl"] + 0.05, acc
    assert acc["icl"] >= acc["ft"], acc


def test_demo_metrics_and_baselines_present_and_finite(demo_dir):
    metrics = json.loads((demo_dir / "results.json").read_text())["metrics"]
    assert {"rec2ftp", "simaou", "simam", "kendall"} <= set(metrics)
    for name, metric in metrics.items():
        assert math.isfinite(metric["value"]), name
        assert metric["baselines"], name
        for baseline, value in metric["baselines"].items():
            assert value is not None and math.isfinite(value), (name, baseline)


def test_demo_writes_the_report(demo_dir):
    for name in ("results.json", "metrics.csv", "views.json", "report.html"):
        assert (demo_dir / name).stat().st_size > 0, name
    page = (demo_dir / "report.html").read_text()
    assert "ColoredTokensMulti" in page and "AttentionHeads" in page  # circuitsvis panels


def test_demo_refuses_an_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub"), "--quiet"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_checkpoint_is_small_and_safetensors():
    files = list(toy_model_dir().iterdir())
    assert any(f.name == "model.safetensors" for f in files)
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in files)
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
