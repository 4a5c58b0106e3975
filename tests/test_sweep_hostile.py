"""``icl-lens sweep`` and ``icl-lens report DIR`` against hostile use (issue 20): changed
inputs under a finished sweep, lost results, stale tables, conflicting or huge grids,
and every error a CLI user can reach, each one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from icl_lens import load_task
from icl_lens.cli import main
from icl_lens.study.checkpoint import fingerprint_task
from icl_lens.sweep import executors, worker
from icl_lens.sweep.grid import Cell, Grid, GridError, run_parser
from icl_lens.sweep.guard import active_jobs, hold_sweep
from icl_lens.sweep.launch import sweep
from icl_lens.sweep.status import read_status
from icl_lens.views.sweep_report import render_sweep_report
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task
from tests.test_sweep import write_grid

FAST = {"template": TEMPLATE, "lr_grid": "1e-1", "max_queries": 6, "kendall_queries": 4}
FAST |= {"shots": 2, "control": False, "retest": False}


def save_model(path: Path, arch: str = "gpt2") -> Path:
    shutil.rmtree(path, ignore_errors=True)
    make_hf_model(arch).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """A model directory and a task file of this test's own (the tests change them)."""
    return save_model(tmp_path / "model"), write_task(tmp_path / "task.jsonl")


def grid_of(inputs, grid, **run) -> Grid:
    """A grid on ``inputs`` with the fast settings; a run key set to None is left out."""
    model, task = inputs
    settings = {"model": str(model), "task": str(task), **FAST, **run}
    return Grid.from_dict(
        {"run": {k: v for k, v in settings.items() if v is not None}, "grid": grid}
    )


def run_debug(grid: Grid, out: Path, **kwargs):
    return sweep(grid, out, executor="debug", quiet=True, log=None, **kwargs)


def zsl(out: Path) -> dict:
    summary = pd.read_parquet(out / "summary.parquet")
    rows = summary.query("metric == 'accuracy' and variant == 'zsl' and baseline == 'none'")
    return dict(zip(rows["seed"], rows["value"], strict=True))


# ---- 1. a finished cell is reused only with the inputs it was computed with -------------


def test_a_rewritten_task_file_is_refused_then_recomputed_when_asked(inputs, tmp_path):
    model, task = inputs
    out = tmp_path / "out"
    run_debug(grid_of(inputs, {"seed": [1]}), out)
    before = zsl(out)[1]
    write_task(task, labels=("good", "bad"))  # same path, labels flipped
    grid = grid_of(inputs, {"seed": [1, 2]})
    (seed1, seed2) = grid.cells
    with pytest.raises(GridError) as err:
        run_debug(grid, out)
    message = str(err.value)
    assert f"1 cells under {out} were computed with other inputs" in message
    assert f"the task's data ({task})" in message and seed1.name in message
    assert "--recompute-changed" in message
    assert not (out / "cells" / seed2.name).exists()  # nothing ran, nothing mixed
    result = run_debug(grid, out, recompute_changed=True)
    assert result.recomputed == [seed1.name] and result.failed == []
    (kept,) = (out / "replaced").iterdir()  # the old cell is kept, not deleted
    assert kept.name.startswith(seed1.name) and (kept / "results.json").exists()
    config = json.loads((out / "cells" / seed1.name / "checkpoints" / "config.json").read_text())
    assert config["task"] == grid.task_fingerprints[seed1.id]
    # the run loads the authors' 2000 validation examples and measures max_queries of them
    assert config["task"] == fingerprint_task(load_task(task, template=TEMPLATE))
    after = zsl(out)
    assert after[1] == pytest.approx(1 - before)  # the flipped labels: every answer flips
    assert run_debug(grid, out).already_done == 2  # unchanged inputs: reused


def test_a_replaced_model_directory_is_refused(inputs, tmp_path, capsys):
    model, _ = inputs
    out = tmp_path / "out"
    grid = grid_of(inputs, {"seed": [1]})
    run_debug(grid, out)
    status = read_status(out / "cells" / grid.cells[0].name)
    assert set(status["inputs"]) == {"task", "model"} and status["inputs"]["model"]
    os.utime(model / "config.json")  # touched, same bytes: still the same model
    assert run_debug(grid_of(inputs, {"seed": [1]}), out).already_done == 1
    save_model(model, "llama")  # GPT-2 -> Llama at the same path
    with pytest.raises(GridError, match=rf"the model's files \({model}\) changed"):
        run_debug(grid_of(inputs, {"seed": [1, 2]}), out)
    path = write_grid(tmp_path / "grid.toml", {"run": grid.run, "grid": grid.grid})
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    line = f"changed  {out / 'cells' / grid.cells[0].name}  (the model's files ({model}) changed)"
    assert line in capsys.readouterr().out
    assert not (out / "cells").joinpath(grid_of(inputs, {"seed": [1, 2]}).cells[1].name).exists()


def test_a_model_is_hashed_once_per_sweep_and_not_again_while_unchanged(inputs, tmp_path):
    from icl_lens.model import gguf

    calls = []
    real = gguf._sha256

    def counting(files):
        calls.append(files)
        return real(files)

    grid = grid_of(inputs, {"seed": [1, 2, 3], "shots": [1, 2]}, shots=None)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gguf, "_sha256", counting)
        from icl_lens.sweep.inputs import cell_inputs

        first = cell_inputs(grid, tmp_path)
        assert len(calls) == 1  # six cells, one model: hashed once
        again = cell_inputs(grid, tmp_path)
        assert len(calls) == 1 and again == first  # unchanged files: read from inputs.json
    assert len({v["model"] for v in first.values()}) == 1


# ---- 2. done means the results are there -------------------------------------------------


def test_a_done_cell_whose_results_are_gone_runs_again(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    grid = grid_of(inputs, {"seed": [1, 2]})
    run_debug(grid, out)
    lost = out / "cells" / grid.cells[1].name
    (lost / "results.json").unlink()
    assert read_status(lost)["state"] == "done"
    path = write_grid(tmp_path / "grid.toml", {"run": grid.run, "grid": grid.grid})
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert f"pending  {lost}" in capsys.readouterr().out
    result = run_debug(grid, out)
    assert result.already_done == 1 and len(result.done) == 2 and result.failed == []
    assert (lost / "results.json").exists()
    assert pd.read_parquet(out / "summary.parquet")["cell"].nunique() == 2


# ---- 3. the report's counts and tables come from the cells there --------------------------


def test_the_report_rebuilds_stale_tables_from_the_cells_there(inputs, tmp_path):
    out = tmp_path / "out"
    run_debug(grid_of(inputs, {"shots": [2], "seed": [1, 2]}, shots=None), out)
    stale = tmp_path / "stale.parquet"
    shutil.copy(out / "aggregate.parquet", stale)
    # the grid changes to shots 3 x three seeds, and the sweep stops after one cell
    grid = grid_of(inputs, {"shots": [3], "seed": [1, 2, 3]}, shots=None)
    run_debug(grid_of(inputs, {"shots": [3], "seed": [1]}, shots=None), out)
    (out / "sweep.json").write_text(json.dumps(grid.to_dict()))
    shutil.copy(stale, out / "aggregate.parquet")  # the shots-2 aggregate, left behind
    page = tmp_path / "page.html"
    assert main(["report", str(out), "--out", str(page)]) == 0
    html = page.read_text()
    assert "3 cells, 1 done" in html and "2 not finished" in html
    aggregate = pd.read_parquet(out / "aggregate.parquet")
    assert set(aggregate["shots"]) == {3} and aggregate["n"].max() == 1  # one cell
    shutil.rmtree(out / "cells")
    assert main(["report", str(out), "--out", str(page)]) == 0
    html = page.read_text()
    assert "3 cells, 0 done" in html and "3 not finished" in html
    assert pd.read_parquet(out / "aggregate.parquet").empty


def test_a_foreign_aggregate_is_rebuilt_and_render_refuses_it_naming_the_file(inputs, tmp_path):
    out = tmp_path / "out"
    run_debug(grid_of(inputs, {"seed": [1]}), out)
    pd.DataFrame({"x": [1.0]}).to_parquet(out / "aggregate.parquet")
    with pytest.raises(ValueError, match=r"aggregate.parquet lacks the columns \['metric'"):
        render_sweep_report(out)
    assert main(["report", str(out), "--out", str(tmp_path / "p.html")]) == 0
    assert "1 cells, 1 done" in (tmp_path / "p.html").read_text()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("sweep.json", "is not valid JSON"),
        ("failures.json", "is not valid JSON"),
        ("cells/*/results.json", "is not a readable icl-lens result"),
        ("cells/*/values.npz", "is not readable per-query values"),
    ],
)
def test_report_names_a_damaged_file(inputs, tmp_path, capsys, name, says):
    out = tmp_path / "out"
    run_debug(grid_of(inputs, {"seed": [1]}), out)
    (path,) = out.glob(name)
    path.write_text("{not json")
    assert main(["report", str(out)]) == 2
    assert f"{path} {says}" in one_line_error(capsys)


# ---- 7. grids: conflicts, aliases, duplicates, size ---------------------------------------


@pytest.mark.parametrize(
    ("run", "grid", "message"),
    [
        (
            {"control": None, "no_control": True},
            {"control": [True, False]},
            "run.no_control and grid.control both set --no-control; give it in one place",
        ),
        (
            {"max_queries": 4, "max-queries": 5},
            {"seed": [1]},
            "run.max_queries and run.max-queries are the same option",
        ),
        ({}, {"seed": [1, 1]}, "grid.seed lists one value twice (1 is the same"),
        ({}, {"seed": [1, "1"]}, "grid.seed lists one value twice (1 and '1' are the same"),
        ({}, {"seed": [-5]}, "grid.seed = -5:"),
        ({}, {"order_seed": [-1]}, "grid.order_seed = -1:"),
        (
            {"lr_grid": None},
            {"lr_grid": ["-1e-2"]},
            "grid.lr_grid = '-1e-2': must be 'paper', 'short' or positive learning rates",
        ),
        ({}, {"label_words": [["-x", "y"]]}, "grid.label_words = '-x': `icl-lens run` would read"),
    ],
)
def test_a_conflicting_or_misread_grid_is_refused_naming_the_keys(inputs, run, grid, message):
    model, task = inputs
    base = {"model": str(model), "task": str(task), **FAST}
    data = {"run": {k: v for k, v in {**base, **run}.items() if v is not None}, "grid": grid}
    with pytest.raises(GridError) as err:
        Grid.from_dict(data, check_tasks=True)
    assert message in str(err.value)
    assert "run.shots" not in str(err.value)  # the old misattribution


def test_a_dashed_value_reaches_icl_lens_run_as_a_value():
    """``lr_grid = "-1e-2"`` reaches ``icl-lens run`` as a value (argparse read it as an
    option: "expected one argument"), so its own check can name what is wrong with it."""
    cell = Cell({"model": "m", "task": "t", "lr_grid": "-1e-2"}, {"lr_grid": "-1e-2"})
    argv = cell.argv("D", worker._options(run_parser()))[1:]
    assert run_parser().parse_args(argv).lr_grid == "-1e-2"


def test_the_check_loads_the_task_as_the_cell_will(inputs, tmp_path):
    """data_source and validation_fraction reach the grid check (they failed at run time)."""
    model, _ = inputs
    rows = [{"text": f"w{i} w{i + 1}", "label": "good" if i % 2 else "bad"} for i in range(20)]
    single = tmp_path / "single.jsonl"
    single.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = {"model": str(model), **FAST}
    data = {
        "run": {**base, "task": str(single), "validation_fraction": 0.99},
        "grid": {"seed": [1]},
    }
    with pytest.raises(GridError, match=r"run.validation_fraction = 0.99"):
        Grid.from_dict(data, check_tasks=True)
    data = {"run": {**base, "task": "sst2", "data_source": "hub"}, "grid": {"seed": [1]}}
    with pytest.raises(
        GridError, match=r"run.task = 'sst2': cannot load the task \(run.data_source = 'hub'\)"
    ):
        Grid.from_dict(data, check_tasks=True)


def test_a_huge_grid_is_refused_at_once_unless_confirmed(inputs, tmp_path, capsys):
    model, task = inputs
    axes = {
        "seed": list(range(100)),
        "order_seed": list(range(100)),
        "batch_size": list(range(1, 101)),
    }
    path = write_grid(
        tmp_path / "huge.toml", {"run": {"model": str(model), "task": str(task)}, "grid": axes}
    )
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the grid has 1,000,000 cells (100 seed x 100 order_seed x 100 batch_size)" in err
    assert "--max-cells 1000000" in err and not (tmp_path / "o").exists()
    small = {"run": {"model": "m", "task": "t"}, "grid": {"seed": list(range(1001))}}
    with pytest.raises(GridError, match="more than 1,000"):
        Grid.from_dict(small)
    assert len(Grid.from_dict(small, max_cells=1001).cells) == 1001


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"timeout_min": "ten"}, "local.timeout_min = 'ten': a number of minutes >= 0"),
        ({"max_num_timeout": 1.5}, "local.max_num_timeout = 1.5: an integer"),
        (
            {"timeout_min": 0.25},
            "local.timeout_min = 0.25 (15 s) is not longer than the signal delay",
        ),
        ({"visible_gpus": "0"}, "local.visible_gpus = '0': a list of GPU indices"),
    ],
)
def test_executor_tables_are_checked_before_submitit_sees_them(table, message):
    with pytest.raises(GridError) as err:
        Grid.from_dict({"run": {"model": "m", "task": "t"}, "grid": {"seed": [1]}, "local": table})
    assert message in str(err.value)


# ---- one line and exit 2 where a traceback was ------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(inputs, tmp_path, capsys, monkeypatch):
    model, task = inputs
    data = {"run": {"model": str(model), "task": str(task), **FAST}, "grid": {"seed": [1]}}
    path = write_grid(tmp_path / "grid.toml", data)
    (tmp_path / "latin1.toml").write_bytes(b'[run]\ntask = "caf\xe9"\n')
    assert main(["sweep", str(tmp_path / "latin1.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "latin1.toml is not UTF-8 text (byte 17" in one_line_error(capsys)
    (tmp_path / "file").write_text("")
    assert main(["sweep", str(path), "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'} is a file" in one_line_error(capsys)
    dup = write_grid(tmp_path / "dup.toml", {**data, "grid": {"seed": [1, 1]}})
    assert main(["sweep", str(dup), "--out", str(tmp_path / "o")]) == 2
    assert "grid.seed lists one value twice" in one_line_error(capsys)
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)  # no SLURM here
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "slurm"]) == 2
    assert "--executor slurm: sbatch and srun not found" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "jobs.json").write_text('{"executor": "local", "jobs": [')
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "debug"]) == 2
    assert f"{tmp_path / 'o' / 'jobs.json'} is not readable JSON" in one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".sweep.lock", "jobs.json"]


# ---- the concurrency guard ----------------------------------------------------------------


def test_a_running_debug_sweep_is_seen(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    grid = grid_of(inputs, {"seed": [1]})
    seen = []

    def second_sweep(*args):
        with pytest.raises(GridError) as err:
            run_debug(grid, out)
        seen.append(str(err.value))
        return {"cell": "x", "name": "x", "state": "failed", "error": "stopped by the test"}

    monkeypatch.setattr(worker.SweepWorker, "run_cell", staticmethod(second_sweep))
    run_debug(grid, out)
    assert seen == [
        f"another icl-lens sweep of {out} is running (it holds {out / '.sweep.lock'}); wait "
        "for it to end, or stop it, then run the same command again"
    ]
    with hold_sweep(out):  # the same lock, however held
        assert active_jobs(out) == ["another icl-lens sweep command"]
    assert active_jobs(out) == []


def _sleeper(argv: list[str]) -> subprocess.Popen:
    """A process with ``argv`` on its command line, once it runs."""
    code = "import time; print('up', flush=True); time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"up\n"
    return process


def test_a_stale_job_id_does_not_block_and_a_live_controller_does(tmp_path):
    other = _sleeper([])  # alive, but no submitit controller: the id was reused
    controller = _sleeper(["submitit.local._local", str(tmp_path / "logs")])
    try:
        record = {"executor": "local", "jobs": [{"job_id": str(other.pid), "cells": []}]}
        (tmp_path / "jobs.json").write_text(json.dumps(record))
        assert active_jobs(tmp_path) == []
        record["jobs"].append({"job_id": str(controller.pid), "cells": []})
        (tmp_path / "jobs.json").write_text(json.dumps(record))
        assert active_jobs(tmp_path) == [f"local job {controller.pid}"]
    finally:
        for process in (other, controller):
            process.kill()
            process.wait()
    assert active_jobs(tmp_path) == []


def test_a_worker_outliving_its_controller_blocks_a_rerun(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from icl_lens.sweep.guard import hold_worker\n"
        "with hold_worker(Path(sys.argv[1]), '4242'):\n"
        "    print('held', flush=True); time.sleep(120)"
    )
    held = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert held.stdout.readline().strip() == "held"
        host = socket.gethostname()
        assert active_jobs(tmp_path) == [f"worker pid {held.pid} on {host}, job 4242"]
        with pytest.raises(
            GridError, match=f"worker pid {held.pid} on .*, job 4242 of an earlier sweep"
        ):
            sweep(
                Grid.from_dict({"run": {"model": "m", "task": "t"}, "grid": {"seed": [1]}}),
                tmp_path,
                log=None,
            )
    finally:
        held.kill()
        held.wait()
    assert active_jobs(tmp_path) == []  # the lock went with the process


# ---- local workers: a killed controller, a timeout -------------------------------------------

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="finds the worker process through /proc"
)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _local_sweep(grid, out, monkeypatch):
    from tests.test_sweep import _run_in_thread

    return _run_in_thread(grid, out, monkeypatch)


def _wait(predicate, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpointed(out: Path, attempt: int = 1):
    for ckpt in out.glob("cells/*/checkpoints/*.pt"):
        status = read_status(ckpt.parent.parent)
        if status["state"] == "running" and status["attempt"] == attempt:
            return ckpt.parent.parent
    return None


@needs_proc
def test_killing_the_job_id_leaves_a_worker_that_blocks_the_rerun(inputs, tmp_path, monkeypatch):
    from tests.test_sweep import _job_pid

    out = tmp_path / "out"
    grid = grid_of(inputs, {"seed": [1]})
    thread, box = _local_sweep(grid, out, monkeypatch)
    controller = _job_pid(out)
    _wait(lambda: _checkpointed(out), "a checkpoint")
    (task,) = _children(controller)
    os.kill(task, signal.SIGSTOP)  # held mid-cell, so that it cannot finish meanwhile
    os.kill(controller, signal.SIGKILL)  # the job id jobs.json names; its worker lives on
    try:
        thread.join(timeout=120)
        with pytest.raises(GridError, match=f"worker pid {task} on"):
            sweep(grid, out, executor="debug", log=None)
    finally:
        os.kill(task, signal.SIGKILL)
    _wait(lambda: not active_jobs(out), "the worker's lock to go")


@needs_proc
def test_a_local_timeout_requeues_then_names_the_limit(inputs, tmp_path, monkeypatch):
    """timeout_min <= 10 makes submitit count every signal as a timeout: the first one
    requeues the worker (max_num_timeout = 1), the second ends the job, and the failure
    names the limit and the keys to raise."""
    from tests.test_sweep import _job_pid

    out = tmp_path / "out"
    local = {"timeout_min": 5, "signal_delay_s": 1, "max_num_timeout": 1}
    model, task = inputs
    grid = Grid.from_dict(
        {
            "run": {"model": str(model), "task": str(task), **FAST, "lr_grid": "1e-3,1e-2,1e-1"},
            "grid": {"seed": [1, 2]},
            "local": local,
        }
    )
    thread, box = _local_sweep(grid, out, monkeypatch)
    controller = _job_pid(out)
    for attempt in (1, 2):
        _wait(lambda a=attempt: _checkpointed(out, a), f"attempt {attempt}")
        (task_pid,) = _children(controller)
        os.kill(task_pid, signal.SIGUSR2)
        if attempt == 1:
            _wait(lambda: not _checkpointed(out, 1), "the requeue")
    thread.join(timeout=300)
    failed = box["result"].failed
    assert [f["grid"] for f in failed] == [{"seed": 1}, {"seed": 2}]
    assert "time limit" in failed[0]["error"] and "raise timeout_min" in failed[0]["error"]
    assert "local.timeout_min = 5" in failed[1]["error"]
    log = next((out / "logs").glob("*_0_log.out")).read_text()
    assert "Requeued job" in log and "timed-out too many times" in log


def test_slurm_states_and_job_ends_are_read_as_slurm_writes_them():
    """squeue's lines, slurmstepd's end line in a job's log (a requeue's is no end), and
    what failures.json says of a SLURM job that left no result (tests/slurm runs them on
    a real cluster)."""
    import doctest

    from icl_lens.sweep import slurm

    assert doctest.testmod(slurm).failed == 0
    states = slurm.parse_squeue("8_0|RUNNING|None\n8_1|PENDING|Resources\n8_2|COMPLETING|None\n")
    assert [s.ended for s in states.values()] == [False, False, False]
    assert str(states["8_1"]) == "pending: Resources" and str(states["8_0"]) == "running"
    assert slurm.SlurmState("TIMEOUT").ended and slurm.SlurmState("PREEMPTED").ended
    requeue = "JOB 9 ON n1 CANCELLED AT 2026-01-02T03:04:05 DUE TO JOB REQUEUE"
    end = "JOB 9 ON n1 CANCELLED AT 2026-01-02T04:00:00 DUE TO TIME LIMIT"
    requeue, limit = (f"slurmstepd-n1: error: *** {line} ***" for line in (requeue, end))
    assert slurm.slurm_end_line(requeue) == ""
    assert slurm.slurm_end_line(f"{requeue}\n[sweep] ...\n{limit}\n") == end
    cancelled = slurm.SlurmState("CANCELLED", "by 1000")
    assert slurm.describe_end("8_1", cancelled, limit) == (
        "SLURM job 8_1 ended CANCELLED (by 1000: scancel, or an administrator); "
        f"its log says '{end}'"
    )
    assert "no longer known to squeue or sacct" in slurm.describe_end("8_1", None)
    unset = executors.timeout_note("slurm", Grid(run={}, grid={}))  # submitit asks for 5 min
    assert unset.startswith("the job reached 5 minutes (submitit's default: slurm.timeout_min")
