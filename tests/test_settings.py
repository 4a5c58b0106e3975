"""One settings object for the study: every value that cannot work is refused when the
settings are made, naming the setting (in Python) or the option (on the command line),
before a model or a task is touched."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

import icl_lens as il
from icl_lens.cli import main
from icl_lens.study.settings import SettingsError, StudySettings
from tests.test_cli_hostile import one_line_error, run_args
from tests.test_compare import write_task


def test_doctests():
    import icl_lens.cli.study_options as options
    import icl_lens.study.settings as settings

    for module in (settings, options):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted and not result.failed


@pytest.mark.parametrize(
    "options, message",
    [
        ({"shots": "4"}, r"shots must be a whole number >= 1, got '4' \(str\)"),
        ({"shots": 4.0}, r"shots must be a whole number >= 1, got 4.0 \(float\)"),
        ({"shots": True}, r"shots must be a whole number >= 1, got True \(bool\)"),
        ({"seed": "1"}, r"seed must be a whole number >= 0, got '1' \(str\)"),
        ({"seed": -1}, r"seed must be >= 0 \(it seeds a random generator\), got -1"),
        ({"order_seed": -1}, "order_seed must be >= 0, got -1"),
        ({"max_queries": 0}, "max_queries must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"kendall_queries": 0}, "kendall_queries must be >= 1, got 0"),
        ({"n_draws": 0}, "n_draws must be >= 1, got 0"),
        ({"lr_grid": "-1e-2"}, "lr_grid must be 'paper', 'short' or positive learning rates"),
        ({"lr_grid": [0.1, float("nan")]}, "lr_grid must be"),
        ({"protocol": "dai"}, "protocol must be one of prediction, dai2023; got 'dai'"),
        ({"ft_mode": "causal"}, "ft_mode must be one of standard, layer_causal, 'both'"),
        ({"retest": "no"}, "retest must be True or False, got 'no'"),
    ],
)
def test_python_names_the_setting_before_touching_the_model(options, message):
    """``compare`` checks its settings first: the model here is not even a model."""
    with pytest.raises(SettingsError, match=message) as err:
        il.compare(object(), "no-such-task", progress=False, **options)
    assert err.value.name == next(iter(options))


def test_an_unknown_setting_suggests_the_nearest():
    with pytest.raises(TypeError, match="'shot' is not a study setting; did you mean 'shots'"):
        il.compare(object(), "no-such-task", shot=4)
    with pytest.raises(TypeError, match="settings must be a StudySettings"):
        il.compare(object(), "no-such-task", settings=4)


def test_settings_and_keywords_are_the_same_study():
    s = StudySettings(shots=8, ft_mode="both", lr_grid=[0.1, 0.01])
    assert StudySettings.of(s, seed=3) == StudySettings(
        shots=8, seed=3, ft_mode=("standard", "layer_causal"), lr_grid=(0.1, 0.01)
    )
    assert StudySettings.of({"shots": 8}).shots == 8
    assert s.to_dict()["ft_mode"] == ["standard", "layer_causal"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.models import make_hf_model, make_tokenizer

    root = tmp_path_factory.mktemp("settings")
    make_hf_model("gpt2").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--seed", "-5", "--seed must be >= 0 (it seeds a random generator), got -5"),
        ("--order-seed", "-1", "--order-seed must be >= 0, got -1"),
        ("--kendall-queries", "0", "--kendall-queries must be >= 1, got 0"),
        ("--control-draws", "0", "--control-draws must be >= 1, got 0"),
        ("--lr-grid=-1e-2", None, "--lr-grid must be 'paper', 'short' or positive learning"),
        ("--n-resamples", "0", "--n-resamples must be >= 1, got 0"),
    ],
)
def test_the_command_line_names_the_option_before_loading(
    files, tmp_path, capsys, option, value, message
):
    task = write_task(tmp_path / "t.jsonl")
    extra = [option] if value is None else [option, value]
    assert main(run_args(files / "model", task, tmp_path / "o", *extra)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()  # refused before any directory or model


def test_a_closed_output_pipe_is_one_line_and_the_results_are_written(files, tmp_path):
    """``icl-lens run ... | head``: the reader is gone before the table is printed."""
    task = write_task(tmp_path / "t.jsonl")
    out = tmp_path / "o"
    argv = run_args(files / "model", task, out, "--no-control", "--no-retest")
    code = f"import sys; from icl_lens.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 2
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert "error: stopped printing, the output pipe closed" in err
    assert (out / "results.json").is_file() and (out / "metrics.csv").is_file()
