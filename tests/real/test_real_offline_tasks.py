"""The paper's five tasks from StaICC's copies, offline: sizes, classes, source, label
order, and the files hold nothing the restricted unpickler has to refuse."""

from __future__ import annotations

import pickletools
from collections import Counter

import pytest

import icl_lens as il
from icl_lens.data.staicc import HOLDOUT_SEED, STAICC_COPIES, _staicc_dir
from icl_lens.data.task_sources import TaskLoadError

# sizes of the hub splits the copies were made from (AG News: train + test)
COPY_SIZES = {"sst2": 67349, "sst5": 8544, "mr": 8530, "subj": 8000, "agnews": 127600}

# (word, class index it should mostly carry): checks that the files' class indices mean
# PAPER_TASKS' label words (e.g. 0 = Negative), which a flipped order would break
LABEL_ORDER = {
    "sst2": [(" wonderful ", 1), (" boring ", 0)],
    "sst5": [(" wonderful ", 4), (" worst ", 0)],
    "mr": [(" wonderful ", 1), (" boring ", 0)],
    "subj": [(" i ", 1), (" his ", 0)],
    "agnews": [(" iraq ", 0), (" touchdown ", 1), (" stocks ", 2), (" software ", 3)],
}


@pytest.mark.parametrize("name", sorted(COPY_SIZES))
def test_paper_task_loads_offline_from_staicc(name):
    task = il.load_task(name, validation_limit=None)  # hub offline (tests/conftest.py)
    assert task.source == "staicc" and task.info["staicc_file"] == STAICC_COPIES[name].file
    held = STAICC_COPIES[name].validation_size
    assert task.info["holdout_of"] == COPY_SIZES[name]
    assert task.info["holdout_size"] == held and task.info["holdout_seed"] == HOLDOUT_SEED
    assert len(task.validation) == held and len(task.train) == COPY_SIZES[name] - held
    assert all(n > 0 for n in task.label_counts("train").values())
    assert all(n > 0 for n in task.label_counts("validation").values())
    train_texts = {ex.fields["text"] for ex in task.train[:2000]}
    assert all(ex.fields["text"] for ex in task.validation)
    for word, label in LABEL_ORDER[name]:
        hits = Counter(ex.label for ex in task.train if word in f" {ex.fields['text'].lower()} ")
        assert hits.most_common(1)[0][0] == label, (word, hits)
    capped = il.load_task(name, source="staicc")  # the default cap of 2000 queries
    assert len(capped.validation) == min(2000, held)
    assert {ex.fields["text"] for ex in capped.train[:2000]} == train_texts


@pytest.mark.parametrize("name", sorted(COPY_SIZES))
def test_staicc_files_hold_no_globals(name):
    data = (_staicc_dir() / STAICC_COPIES[name].file).read_bytes()
    ops = Counter(op.name for op, _, _ in pickletools.genops(data))
    code = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}
    assert not code & set(ops), ops
    assert {"SHORT_BINUNICODE", "BINUNICODE", "TUPLE2"} & set(ops)


def test_cb_has_no_offline_copy():
    with pytest.raises(TaskLoadError, match="No offline copy of 'cb'"):
        il.load_task("cb")
