"""``protocol="dai2023"`` sizes the context and trains FT as the authors' code does
(LMOps struprompting/tasks/fewshot_task.py): the longest validation example the task
holds is reserved, not only the measured ones'; the prompt stays 2 tokens below the
context; FT trains on every drawn demonstration even when the prompt keeps fewer, and the
token-level metrics compare the demonstrations both sides hold."""

from __future__ import annotations

import pytest

import icl_lens as il
from icl_lens.data.task_sources import task_from_records
from tests.models import make_model

SHOTS = 6


@pytest.fixture(scope="module")
def model():
    return make_model("gpt2", n_ctx=64)[0]


@pytest.fixture(scope="module")
def task():
    train = [
        {"text": " ".join(f"w{(i + j) % 80}" for j in range(6)), "label": i % 2} for i in range(12)
    ]
    long_text = " ".join(f"w{j % 80}" for j in range(30))
    validation = [
        {"text": "w1 w2", "label": 0},
        {"text": "w3 w4", "label": 1},
        {"text": long_text, "label": 0},  # not measured with max_queries=2
    ]
    spec = il.TaskSpec("t", "Input: {text} Label:", (" bad", " good"), separator=" \n")
    return task_from_records(train, validation, spec)


def run(model, task, protocol, **kw):
    opts = dict(shots=SHOTS, lr_grid=[0.1], lr_extend=0, n_draws=1, n_resamples=20)
    return il.compare(model, task, protocol=protocol, progress=False, **{**opts, **kw})


def test_the_budget_reserves_the_longest_example_the_task_holds(model, task):
    with pytest.warns(UserWarning, match="do not fit"):
        dai_two = run(model, task, "dai2023", max_queries=2, control=False, retest=False)
        dai_all = run(model, task, "dai2023", max_queries=None, control=False, retest=False)
    ours = run(model, task, "prediction", max_queries=2, control=False, retest=False)
    assert dai_two.info["k_effective"] == dai_all.info["k_effective"]
    assert dai_two.info["k_effective"] < ours.info["k_effective"]


def test_ft_trains_on_every_drawn_demonstration(model, task):
    with pytest.warns(UserWarning, match="FT still trains on all of them"):
        cmp = run(model, task, "dai2023", max_queries=2)
    assert cmp.info["k_effective"] < SHOTS and cmp.info["k_ft"] == SHOTS
    for trial in cmp.lr_search:
        assert len(trial["losses"]) == SHOTS  # one SGD step per demonstration
    assert cmp.config["k_ft"] == SHOTS
    frame = cmp.metrics()
    kendall = frame.query("metric == 'kendall' and layer == -1")
    assert {"none", "icl_retest", "ft_retest", "untrained_weights"} <= set(kendall["baseline"])
    assert kendall.query("baseline == 'none'")["value"].notna().all()  # aligned, compared


def test_our_protocol_trains_on_the_prompt_it_measures(model, task):
    with pytest.warns(UserWarning, match="do not fit"):
        cmp = run(model, task, "prediction", max_queries=None, control=False, retest=False)
    assert cmp.info["k_ft"] == cmp.info["k_effective"] < SHOTS
    assert "k_ft" not in cmp.config  # no new binding where nothing differs
