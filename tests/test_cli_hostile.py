"""``icl-lens run`` and ``icl-lens report`` on hostile input (issue 14): exit code 2, one
line that says what to do, checked before the model is loaded, and no half-made run
directory left behind; a second run on a busy ``--out`` is refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from icl_lens.cli import main
from icl_lens.cli.report import report_main
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task
from tests.test_model_refusals import tiny_bert_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    make_hf_model("gpt2", n_layers=1).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root


def run_args(model, task, out, *extra):
    return [
        "run",
        "--model", str(model),
        "--task", str(task),
        "--template", TEMPLATE,
        "--shots", "4",
        "--out", str(out),
        "--lr-grid", "1e-2",
        "--max-queries", "4",
        "--kendall-queries", "4",
        "--no-control",
        "--quiet",
        *extra,
    ]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("icl-lens run: error: ") or err.startswith("icl-lens report: error: ")
    return err


def bad_model(kind: str, root):
    """A model directory broken in one way."""
    path = root / kind
    if kind == "bert":
        from transformers import BertForMaskedLM

        BertForMaskedLM(tiny_bert_config()).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    elif kind == "no-tokenizer":
        make_hf_model("gpt2", n_layers=1).save_pretrained(path)
    elif kind == "truncated":
        make_hf_model("gpt2", n_layers=1).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "nan":
        hf = make_hf_model("gpt2", n_layers=1)
        with torch.no_grad():
            hf.transformer.ln_f.weight.fill_(float("nan"))
        hf.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("bert", r"encoder \(BertForMaskedLM"),
        ("no-tokenizer", "has no tokenizer .* --tokenizer NAME_OR_DIR"),
        ("truncated", r"model\.safetensors is not a readable safetensors file"),
        ("nan", "the model itself is broken: its zero-shot logits"),
        ("typo", "no such directory: '.*modle'; did you mean '.*model'"),
    ],
)
def test_a_broken_model_is_one_line_and_leaves_no_run_directory(
    files, tmp_path, capsys, kind, message
):
    model = files / "modle" if kind == "typo" else bad_model(kind, tmp_path)
    out = tmp_path / "runs" / "out"
    assert main(run_args(model, write_task(tmp_path / "t.jsonl"), out)) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "runs").exists()  # the directories it made are gone again


def test_output_path_is_checked_before_the_model_is_loaded(files, tmp_path, capsys, monkeypatch):
    import icl_lens.model.loading as loading

    def must_not_load(*a, **kw):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    task = write_task(tmp_path / "t.jsonl")
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert main(run_args(files / "model", task, a_file)) == 2
    assert (
        "--out" in one_line_error(capsys) and "is a file" in capsys.readouterr().err + "is a file"
    )
    assert main(run_args(files / "model", task, a_file / "sub")) == 2
    assert f"cannot create --out {a_file / 'sub'}: {a_file} is a file" in one_line_error(capsys)
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--shots", "0", "--shots must be >= 1, got 0"),
        ("--max-queries", "-1", "--max-queries must be >= 1"),
        ("--validation-fraction", "1.5", "--validation-fraction must be between 0 and 1"),
    ],
)
def test_impossible_numbers_are_named_by_their_option(
    files, tmp_path, capsys, option, value, message
):
    task = write_task(tmp_path / "t.jsonl")
    args = run_args(files / "model", task, tmp_path / "o", option, value)  # the last one wins
    assert main(args) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_task_errors_speak_command_line(files, tmp_path, capsys):
    rows = [{"text": "w1 w2", "label": i % 2, "split": s} for i, s in enumerate("tv" * 4)]
    for r in rows:
        r["split"] = {"t": "train", "v": "validation"}[r["split"]]
    task = tmp_path / "indices.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(run_args(files / "model", task, tmp_path / "o")) == 2
    err = one_line_error(capsys)
    assert "--label-words Negative Positive" in err and "label_words=" not in err


def test_a_file_without_split_column_runs_with_a_stated_held_out_split(files, tmp_path, capsys):
    rows = [
        json.loads(line)
        for line in write_task(tmp_path / "t.jsonl").read_text().split("\n")
        if line
    ]
    for r in rows:
        del r["split"]
    task = tmp_path / "one_file.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    args = run_args(files / "model", task, out, "--validation-fraction", "0.25")
    args.remove("--quiet")
    assert main(args) == 0
    assert (
        "held out of one_file.jsonl (no split column): 7 of 28 records" in capsys.readouterr().err
    )
    info = json.loads((out / "results.json").read_text())["info"]["task_info"]
    assert (info["holdout_size"], info["holdout_seed"], info["holdout_of"]) == (7, 0, 28)


def test_an_over_long_demonstration_is_skipped_with_a_note(files, tmp_path, capsys):
    task = write_task(tmp_path / "t.jsonl", n_train=5)
    rows = [json.loads(line) for line in task.read_text().split("\n") if line]
    rows[0]["text"] = " ".join(["w1"] * 200)  # alone longer than the context of 128
    task.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    skipped = r"skipped demonstrations too long .*: demonstration \d has 20\d tokens; the context"
    args = run_args(files / "model", task, out, "--shots", "5")
    args.remove("--quiet")  # --quiet silences notes
    with pytest.warns(UserWarning, match=skipped):
        assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["info"]["k_effective"] == 4


def test_warnings_print_as_one_line():
    from icl_lens.cli.main import _one_line_warnings

    with _one_line_warnings("icl-lens run"):
        line = warnings.formatwarning("a note", UserWarning, "file.py", 3, "source line")
    assert line == "icl-lens run: warning: a note\n"


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from icl_lens.cli.out_dir import claim_output_directory
    with claim_output_directory(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the test closes stdin
    """
)


def test_a_second_run_on_a_busy_out_directory_is_refused(files, tmp_path, capsys):
    out = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        task = write_task(tmp_path / "t.jsonl")
        assert main(run_args(files / "model", task, out)) == 2
        err = one_line_error(capsys)
        assert f"--out {out} is in use by another icl-lens run" in err
        assert out.is_dir()  # the refused run removed nothing of the first one's
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0


@pytest.mark.parametrize(
    "views, message",
    [
        ([], "expected an object with meta_gradients"),
        ({"meta_gradients": [{}]}, r"meta_gradients\[0\] has no 'layer'"),
        ({"meta_gradients": [], "heads": {"icl_norm": [1.0]}}, "heads has no 'layer', 'head'"),
        ({"attention": {"layer": 0}}, "attention has no 'heads'"),
    ],
)
def test_report_on_views_of_the_wrong_shape_is_one_line(tmp_path, capsys, views, message):
    results = {"accuracy": {"zsl": 0.5, "icl": 0.75, "ft": 0.5}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "views.json").write_text(json.dumps(views))
    assert report_main([str(tmp_path)]) == 2
    assert re.search(message, one_line_error(capsys))
