"""``icl-lens sweep``: the grid checked before anything runs, cells equal to direct
``compare`` calls, a failing cell recorded while the others go on, a preempted or killed
worker resumed to the same tables, and the sweep's report."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import icl_lens as il
from icl_lens.cli import main
from icl_lens.study.comparison import Comparison
from icl_lens.sweep import launch, worker
from icl_lens.sweep.grid import Grid, GridError
from icl_lens.sweep.launch import plan_jobs, sweep
from icl_lens.sweep.worker import read_status
from tests.models import make_hf_model, make_tokenizer
from tests.test_compare import TEMPLATE, write_task

RUN = {"template": TEMPLATE, "lr_grid": "1e-1", "max_queries": 6, "kendall_queries": 4}
GRID = {"shots": [2, 3], "seed": [1, 2]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-files")
    make_hf_model("gpt2").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root / "model", write_task(root / "two_class.jsonl")


def grid_dict(files, grid=None, **run):
    model, task = files
    return {"run": {"model": str(model), "task": str(task), **RUN, **run}, "grid": grid or GRID}


def write_grid(path: Path, data: dict) -> Path:
    """A TOML file of ``data`` (strings, numbers, booleans and lists of them)."""
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def debug_sweep(files, tmp_path_factory):
    """The 2x2 grid through submitit's DebugExecutor, counting model loads."""
    out = tmp_path_factory.mktemp("debug")
    loads = []
    real = worker._Models.get

    def counting(self, args):
        if self.key is None or self.key != worker._model_key(args):
            loads.append(args.model)
        return real(self, args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(worker._Models, "get", counting)
        result = sweep(
            Grid.from_dict(grid_dict(files)), out, executor="debug", quiet=True, log=None
        )
    return out, result, loads


# ---- the grid file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": {"shots": []}}, "grid.shots: a non-empty list of values"),
        ({"grid": {"shot": [1, 2]}}, "grid.shot: not an `icl-lens run` option; choose from"),
        ({"grid": {"shots": [2, "x"]}}, "grid.shots = 'x': invalid int value: 'x'"),
        ({"grid": {"protocol": ["dai2023", "dai"]}}, "grid.protocol = 'dai': invalid choice"),
        ({"run": {"lr_grid": "fast"}}, "run.lr_grid = 'fast': must be 'paper', 'short'"),
        ({"run": {"out": "x"}}, "run.out: the sweep names each cell's directory"),
        ({"run": {"batch_size": [1, 2]}}, "run.batch_size: `icl-lens run` takes one value"),
        ({"run": {"control": "yes"}}, "run.control: a flag takes true or false"),
        ({"grid": {"shots": [2, 40]}}, "grid.shots = 40: k=40 demonstrations requested"),
        ({"grid": {"batch_size": [8, 0]}}, "grid.batch_size = 0: must be >= 1, got 0"),
        ({"run": {"task": "nowhere.jsonl"}}, "run.task = 'nowhere.jsonl': cannot load the task"),
        ({"slurm": {"partitionn": "gpu"}}, "slurm.partitionn: submitit does not know it"),
        ({"slurm": {"tasks_per_node": 2}}, "slurm.tasks_per_node: a sweep worker is one task"),
        ({"cluster": {}}, "unknown section [cluster]"),
    ],
)
def test_an_invalid_grid_is_refused_naming_the_key(files, change, message):
    data = grid_dict(files)
    for section, table in change.items():
        data[section] = {**data.get(section, {}), **table}
    if change.get("grid", {}).keys() & {"shot"}:
        del data["grid"]["shots"]
    with pytest.raises(GridError) as err:
        Grid.from_dict(data, check_tasks=True)
    assert message in str(err.value)


def test_nothing_is_submitted_for_an_invalid_grid(files, tmp_path, capsys):
    path = write_grid(tmp_path / "bad.toml", grid_dict(files, {"shots": [2, "x"], "seed": [1]}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "grid.shots = 'x': invalid int value" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cells_have_stable_readable_names(files):
    cells = Grid.from_dict(grid_dict(files)).cells
    assert [c.grid for c in cells][:2] == [{"shots": 2, "seed": 1}, {"shots": 2, "seed": 2}]
    assert cells[0].name == f"shots=2,seed=1-{cells[0].id}"
    more = Grid.from_dict(grid_dict(files, {"shots": [2, 3, 4], "seed": [1, 2]})).cells
    assert {c.id for c in cells} < {c.id for c in more}  # a new value keeps the old cells
    options = worker._options(worker.run_parser())
    argv = Grid.from_dict(grid_dict(files, control=False)).cells[0].argv("D", options)
    assert "--no-control" in argv and argv[-2:] == ["--out", "D"]
    assert "--no-control" not in Grid.from_dict(grid_dict(files, control=True)).cells[0].argv(
        "D", options
    )


def test_jobs_group_cells_by_model():
    cells = Grid.from_dict(
        {"run": {"task": "sst2"}, "grid": {"seed": [1, 2, 3], "model": ["a", "b"]}}
    ).cells
    jobs = plan_jobs(cells, 2)
    assert [[c.grid["model"] for c in job] for job in jobs] == [["a"] * 3, ["b"] * 3]
    assert [len(j) for j in plan_jobs(cells, 4)] == [2, 2, 2] and len(plan_jobs(cells, 1)) == 1


# ---- running cells ----------------------------------------------------------------------


def test_a_2x2_debug_sweep_equals_direct_compare_calls(debug_sweep, files):
    out, result, loads = debug_sweep
    assert len(result.done) == 4 and result.failed == [] and loads == [[str(files[0])]]
    summary = pd.read_parquet(out / "summary.parquet")
    model = il.load_model(files[0])
    task = il.load_task(files[1], template=TEMPLATE, validation_limit=RUN["max_queries"])
    for cell in Grid.from_dict(grid_dict(files)).cells:
        cmp = il.compare(
            model,
            task,
            shots=cell.grid["shots"],
            seed=cell.grid["seed"],
            lr_grid=RUN["lr_grid"],
            kendall_queries=RUN["kendall_queries"],
            progress=False,
        )
        rows = summary[summary["cell"] == cell.id]
        assert (rows[["shots", "seed"]] == [cell.grid["shots"], cell.grid["seed"]]).all().all()
        got = rows.drop(columns=["cell", "shots", "seed"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(
            got, cmp.labelled_frame(), check_exact=True, check_dtype=False
        )
    assert json.loads((out / "failures.json").read_text()) == []


def test_the_aggregate_is_the_mean_over_seeds(debug_sweep):
    out, _, _ = debug_sweep
    summary = pd.read_parquet(out / "summary.parquet")
    aggregate = pd.read_parquet(out / "aggregate.parquet")
    key = ["shots", "metric", "variant", "baseline", "layer", "head"]
    assert len(aggregate) == len(summary.drop_duplicates(key))
    mean = summary.groupby(key)["value"].mean().rename("expected").reset_index()
    both = aggregate.merge(mean, on=key)
    assert ((both["mean"] - both["expected"]).abs().fillna(0) < 1e-12).all()
    acc = aggregate.query("metric == 'accuracy' and baseline == 'none'")
    assert set(acc["variant"]) == {"zsl", "icl", "ft"} and (acc["n"] == 2).all()


def test_the_aggregate_interval_is_the_hierarchical_bootstrap_over_seeds(debug_sweep):
    """Each aggregate row's interval: demonstration sets (the cells' seeds), then queries,
    from the values.npz every cell's run wrote; per-head rows have none."""
    from icl_lens.analyses import VALUE_RANGES, hierarchical_table

    out, _, _ = debug_sweep
    summary = pd.read_parquet(out / "summary.parquet")
    aggregate = pd.read_parquet(out / "aggregate.parquet")
    row = ("simaou", "normalised", "none", "standard")
    for shots, cells in summary.drop_duplicates("cell").groupby("shots"):
        runs = {}
        for _, cell in cells.iterrows():
            (path,) = (out / "cells").glob(f"*-{cell['cell']}/values.npz")
            runs[(cell["seed"],)] = Comparison.load_values(path)[row][()]
        expected = hierarchical_table(runs, bounds=VALUE_RANGES["simaou"]).iloc[0]
        got = aggregate[aggregate["shots"] == shots].query(
            "metric == 'simaou' and variant == 'normalised' and baseline == 'none' "
            "and layer == -1 and head == -1"
        )
        assert got["ci_low"].item() == pytest.approx(expected["ci_low"], abs=1e-6)
        assert got["ci_high"].item() == pytest.approx(expected["ci_high"], abs=1e-6)
        assert got["ci_low"].item() < got["mean"].item() < got["ci_high"].item()
    heads = aggregate.query("metric == 'simam' and head >= 0")
    assert len(heads) and heads["ci_low"].isna().all()


def test_a_rerun_skips_finished_cells(debug_sweep, files, monkeypatch):
    out, _, _ = debug_sweep
    calls = []
    monkeypatch.setattr(
        worker.SweepWorker, "run_cell", staticmethod(lambda *a: calls.append(a) or {})
    )
    again = sweep(Grid.from_dict(grid_dict(files)), out, executor="debug", log=None)
    assert calls == [] and again.already_done == 4 and len(again.done) == 4


def test_comparison_to_parquet_and_to_dataset(debug_sweep, tmp_path):
    out, _, _ = debug_sweep
    cell = next((out / "cells").iterdir())
    cmp = Comparison.from_json(cell / "results.json")
    path = cmp.to_parquet(tmp_path / "c.parquet", labels={"model": "tiny", "seed": 1})
    back = pd.read_parquet(path)
    assert list(back.columns[:2]) == ["model", "seed"] and (back["model"] == "tiny").all()
    pd.testing.assert_frame_equal(
        back, cmp.labelled_frame({"model": "tiny", "seed": 1}), check_dtype=False
    )
    data = cmp.to_dataset()
    assert data.num_rows == len(cmp.metrics()) + 6  # 3 accuracies + 3 of the control
    assert data.column_names == list(cmp.labelled_frame().columns)


def test_a_failing_cell_is_recorded_and_the_others_go_on(files, tmp_path, capsys):
    data = grid_dict(files, {"lr_grid": ["1e300", "1e-1"]}, shots=2)
    del data["run"]["lr_grid"]
    path = write_grid(tmp_path / "grid.toml", data)
    argv = ["sweep", str(path), "--out", str(tmp_path / "out"), "--executor", "debug", "--quiet"]
    assert main(argv) == 1
    assert "1 cells failed" in capsys.readouterr().err
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["grid"] for f in failures] == [{"lr_grid": "1e300"}]
    assert "every learning rate of the grid diverged" in failures[0]["error"]
    summary = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    assert set(summary["lr_grid"]) == {"1e-1"}
    assert main(argv) == 1  # retried, fails again; the done cell is not rerun
    assert read_status(Path(failures[0]["directory"]))["attempt"] == 2


# ---- local workers: preempted and requeued, killed and rerun ------------------------------


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _run_in_thread(grid, out, monkeypatch):
    """The sweep in a thread, its local worker on one CPU thread like this process
    (conftest): the thread count changes float summation order, so only then can its
    tables equal the in-process debug sweep's bitwise."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    box = {}

    def target():
        try:
            box["result"] = sweep(grid, out, executor="local", quiet=True, log=None)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _wait_for_checkpoint(out: Path, timeout: float = 300) -> Path:
    """The first cell's directory, once it holds a finished stage (mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for ckpt in out.glob("cells/*/checkpoints/*.pt"):
            status = read_status(ckpt.parent.parent)
            if status["state"] == "running":
                return ckpt.parent.parent
        time.sleep(0.2)
    raise AssertionError("no cell reached its first checkpoint")


def _job_pid(out: Path) -> int:
    for _ in range(100):
        if (out / "jobs.json").exists():
            return int(json.loads((out / "jobs.json").read_text())["jobs"][0]["job_id"])
        time.sleep(0.1)
    raise AssertionError("no job was submitted")


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="finds the worker process through /proc"
)


@needs_proc
def test_a_preempted_local_worker_is_requeued_and_resumes(
    debug_sweep, files, tmp_path, monkeypatch
):
    """submitit's preemption signal mid-cell: the Checkpointable worker is requeued with
    the same cells and resumes from the cell's checkpoints; the tables equal the
    uninterrupted (debug) sweep's. A timeout goes through the same handler."""
    grid = Grid.from_dict(grid_dict(files, {"shots": [2], "seed": [1, 2]}))
    out = tmp_path / "out"
    thread, box = _run_in_thread(grid, out, monkeypatch)
    controller = _job_pid(out)
    cell_dir = _wait_for_checkpoint(out)
    (task,) = _children(controller)
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before preempting (submitit's default)
    thread.join(timeout=600)
    assert "error" not in box and box["result"].failed == []
    status = read_status(cell_dir)
    assert status["attempt"] == 2 and status["resumed_stages"] >= 1
    log = next((out / "logs").glob("*_0_log.out")).read_text()
    assert "Requeued job" in log and "resuming from" in log
    uninterrupted = pd.read_parquet(debug_sweep[0] / "summary.parquet")
    got = pd.read_parquet(out / "summary.parquet")
    expected = uninterrupted[uninterrupted["cell"].isin(set(got["cell"]))]
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_exact=True)


@needs_proc
def test_a_killed_local_worker_is_recorded_and_a_rerun_resumes(
    debug_sweep, files, tmp_path, monkeypatch
):
    grid = Grid.from_dict(grid_dict(files, {"shots": [3], "seed": [1]}))
    out = tmp_path / "out"
    thread, box = _run_in_thread(grid, out, monkeypatch)
    controller = _job_pid(out)
    cell_dir = _wait_for_checkpoint(out)
    for pid in [*_children(controller), controller]:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    (failure,) = box["result"].failed
    assert "stopped mid-run" in failure["error"] and failure["log"]
    again = sweep(grid, out, executor="debug", log=None)
    assert again.failed == [] and read_status(cell_dir)["resumed_stages"] >= 1
    uninterrupted = pd.read_parquet(debug_sweep[0] / "summary.parquet")
    got = pd.read_parquet(out / "summary.parquet")
    expected = uninterrupted[uninterrupted["cell"].isin(set(got["cell"]))]
    pd.testing.assert_frame_equal(got, expected.reset_index(drop=True), check_exact=True)


# ---- the report ---------------------------------------------------------------------------


def test_report_on_a_sweep_directory(debug_sweep, tmp_path, capsys):
    out, _, _ = debug_sweep
    (out / "failures.json").write_text(
        json.dumps([{"name": "x", "error": "<script>alert(1)</script>", "log": None}])
    )
    page = tmp_path / "sweep.html"
    try:
        assert main(["report", str(out), "--out", str(page)]) == 0
    finally:
        (out / "failures.json").write_text("[]")
    html = page.read_text()
    for title in ("ZSL acc.", "ICL acc.", "FT acc.", "Rec2FTP", "SimAOU", "SimAM", "Kendall"):
        assert f"<th>{title}</th>" in html
    assert html.count("<svg") == 1 and "untrained" in html and "shuffled queries" in html
    for curve in ("SimAOU (normalised)", "SimAM (after)", "Kendall (tau_b)"):
        assert curve in html  # the figure's panel titles, text kept as text
    assert "<script>" not in html and "&lt;script&gt;alert(1)" in html
    assert 'class="key">2</td>' in html and 'class="key">3</td>' in html  # one row per shots
    assert "Intervals: a t interval over demonstration sets" in html and html.count("[") >= 4


def test_executors_get_the_grid_tables_and_local_workers_see_the_gpus(tmp_path, monkeypatch):
    with pytest.raises(GridError, match="unknown executor 'cloud'"):
        launch.make_executor("cloud", tmp_path, Grid(run={}, grid={}), None)
    grid = Grid(run={}, grid={}, local={"timeout_min": 0.5, "signal_delay_s": 3})
    params = launch.make_executor("local", tmp_path, grid, None).parameters
    assert params["timeout_min"] == 0.5 and params["signal_delay_s"] == 3
    assert "gpus_per_node" not in params or params["gpus_per_node"] >= 1
    # submitit's LocalExecutor would hide every GPU (CUDA_VISIBLE_DEVICES="") by default
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    params = launch.make_executor("local", tmp_path, Grid(run={}, grid={}), None).parameters
    assert params["gpus_per_node"] == 2 and params["visible_gpus"] == (5, 7)
    assert params["timeout_min"] == launch.LOCAL_TIMEOUT_MIN  # submitit's default is 2
