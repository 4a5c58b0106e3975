"""Tasks, task sources (hub, local files, records), demonstrations, label-word checks."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from icl_lens.data.demonstrations import (
    ContextFit,
    demonstration_token_counter,
    fit_to_context,
    query_token_budget,
    sample_demonstrations,
    shuffled_indices,
)
from icl_lens.data.task_sources import (
    PAPER_SOURCES,
    TaskLoadError,
    load_task,
    read_records,
    save_task,
    task_from_records,
)
from icl_lens.data.tasks import (
    DEFAULT_TEMPLATE,
    PAPER_TASKS,
    Example,
    Task,
    TaskSpec,
    check_label_words,
    normalize_task_name,
    paper_task_spec,
)

# method.md section 5, "Templates and label words in the authors' code" ({s} -> {text}).
METHOD_TABLE = {
    "sst2": ("Sentence: {text} Label:", ["Negative", "Positive"]),
    "sst5": ("Sentence: {text} Label:", ["terrible", "bad", "neutral", "good", "great"]),
    "mr": ("Review: {text} Sentiment:", ["Negative", "Positive"]),
    "subj": ("Input: {text} Type:", ["objective", "subjective"]),
    "agnews": (
        "Classify the news articles into the categories of World, Sports, Business, and "
        "Technology. Article: {text} Answer:",
        ["World", "Sports", "Business", "Technology"],
    ),
    "cb": (
        "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
        ["True", "False", "Neither"],
    ),
}
METHOD_MD = Path(__file__).resolve().parents[2] / "shared" / "design" / "method.md"


# ----------------------------------------------------------------------------- registry


def test_registry_matches_method_md_table():
    assert list(PAPER_TASKS) == list(METHOD_TABLE)
    for name, (template, words) in METHOD_TABLE.items():
        spec = PAPER_TASKS[name]
        assert spec.name == name
        assert spec.template == template
        assert spec.label_words == tuple(" " + w for w in words)


@pytest.mark.skipif(not METHOD_MD.exists(), reason="design notes not next to this checkout")
def test_registry_matches_method_md_file():
    text = METHOD_MD.read_text()
    rows = re.findall(r"^\| (\w+) \| `(.+)` \| (.+) \|$", text, flags=re.M)
    parsed = {
        normalize_task_name(t): (tpl.replace("{s}", "{text}"), [w.strip() for w in ws.split("/")])
        for t, tpl, ws in rows
    }
    assert parsed == METHOD_TABLE


def test_paper_sources_splits_and_columns():
    assert PAPER_SOURCES["sst2"].config == "sst2"
    assert PAPER_SOURCES["sst2"].validation_split == "validation"  # glue test is unlabelled
    assert PAPER_SOURCES["agnews"].validation_split == "test"
    assert PAPER_SOURCES["subj"].validation_split == "test"
    assert PAPER_SOURCES["sst2"].columns == {"text": "sentence"}
    assert PAPER_SOURCES["cb"].columns == {"premise": "premise", "hypothesis": "hypothesis"}
    # CB: 0=entailment -> True, 1=contradiction -> False, 2=neutral -> Neither
    assert PAPER_SOURCES["cb"].class_names == ("entailment", "contradiction", "neutral")
    assert PAPER_TASKS["cb"].label_names == ("True", "False", "Neither")
    ids = {k: s.paper_id for k, s in PAPER_SOURCES.items()}
    assert ids == {
        "sst2": "glue/sst2",
        "sst5": "SetFit/sst5",
        "mr": "rotten_tomatoes",
        "subj": "SetFit/subj",
        "agnews": "ag_news",
        "cb": "super_glue/cb",
    }
    for key, src in PAPER_SOURCES.items():
        assert set(src.columns) == set(PAPER_TASKS[key].template_fields)


@pytest.mark.parametrize(
    "name,key",
    [("SST-2", "sst2"), ("ag_news", "agnews"), ("AG News", "agnews"), ("rotten_tomatoes", "mr")],
)
def test_name_normalisation(name, key):
    assert normalize_task_name(name) == key
    assert paper_task_spec(name) is PAPER_TASKS[key]


def test_taskspec_validation_and_label_index():
    with pytest.raises(ValueError, match="at least two"):
        TaskSpec("x", "{text}", (" a",))
    with pytest.raises(ValueError, match="repeat"):
        TaskSpec("x", "{text}", (" a", " a"))
    with pytest.raises(ValueError, match="placeholder"):
        TaskSpec("x", "no fields", (" a", " b"))
    spec = TaskSpec("x", "Q: {text} A:", [" Yes", " No"])
    assert spec.label_words == (" Yes", " No")
    assert [spec.label_index(v) for v in (1, " Yes", "no", "NO")] == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="out of range"):
        spec.label_index(2)
    with pytest.raises(ValueError, match="not one of"):
        spec.label_index("maybe")
    with pytest.raises(KeyError, match="needs field 'text'"):
        spec.format_query(Example({"sentence": "hi"}, 0))


# ----------------------------------------------------------------------------- hub path


@pytest.fixture
def offline_datasets():
    import datasets

    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets was imported before offline mode was set")
    return datasets


def test_offline_hub_error_is_clear_and_fast(offline_datasets):
    t0 = time.monotonic()
    with pytest.raises(TaskLoadError) as info:
        load_task("sst2", source="hub")  # "auto" would fall back to StaICC's copy
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "icl-lens run --task path/to/sst2.jsonl" in msg
    assert "offline" in msg and "split" in msg and "Negative, Positive" in msg
    assert info.value.__cause__ is not None  # chained from the datasets error


def _fake_hub(monkeypatch, datasets, tables, calls, script_error_for=()):
    """Replace datasets.load_dataset by in-memory DatasetDicts keyed by (path, config)."""

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw))
        if path in script_error_for and "revision" not in kw:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path}.py")
        if (path, name) not in tables:
            raise datasets.exceptions.DatasetNotFoundError(f"{path} not found")
        return tables[(path, name)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)


def _cb_dict(datasets, names=("entailment", "contradiction", "neutral")):
    feats = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )

    def split(n, tag):
        return datasets.Dataset.from_dict(
            {
                "premise": [f"{tag} premise {i}" for i in range(n)],
                "hypothesis": [f"{tag} hyp {i}" for i in range(n)],
                "idx": list(range(n)),
                "label": [i % 3 for i in range(n)],
            },
            features=feats,
        )

    return datasets.DatasetDict({"train": split(12, "tr"), "validation": split(7, "va")})


def test_hub_loading_maps_columns_labels_and_validation_protocol(monkeypatch, offline_datasets):
    datasets = offline_datasets
    dsd = _cb_dict(datasets)
    calls: list = []
    # the current repo "does not exist" -> falls back to the authors' name, then a script
    # repository -> retried on the parquet conversion
    _fake_hub(monkeypatch, datasets, {("super_glue", "cb"): dsd}, calls, ("super_glue",))
    task = load_task("CB", validation_limit=5)
    assert [c[0] for c in calls] == ["aps/super_glue", "super_glue", "super_glue"]
    assert calls[-1][2] == {"revision": "refs/convert/parquet"}
    assert task.spec is PAPER_TASKS["cb"]
    assert task.info["source"] == "hub" and task.info["hub_path"] == "super_glue"
    assert task.info["n_validation_total"] == 7 and len(task.validation) == 5
    assert [ex.fields["premise"] for ex in task.train] == dsd["train"]["premise"]
    assert [ex.label for ex in task.train] == [i % 3 for i in range(12)]
    ex = task.train[1]  # contradiction -> " False"
    assert task.spec.format_demonstration(ex) == (
        "tr premise 1 Question: tr hyp 1. True, False, or Neither? Answer: False"
    )
    # validation: the authors' Dataset.shuffle(seed=1), then the first validation_limit
    expected = dsd["validation"].shuffle(seed=1)["premise"][:5]
    assert [ex.fields["premise"] for ex in task.validation] == expected


def test_hub_class_name_order_is_checked(monkeypatch, offline_datasets):
    datasets = offline_datasets
    bad = _cb_dict(datasets, names=("contradiction", "entailment", "neutral"))
    _fake_hub(monkeypatch, datasets, {("aps/super_glue", "cb"): bad}, [])
    with pytest.raises(ValueError, match="expected"):
        load_task("cb")


def test_hub_sst2_uses_sentence_column_and_validation_split(monkeypatch, offline_datasets):
    datasets = offline_datasets
    feats = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def split(n, tag, labels):
        return datasets.Dataset.from_dict(
            {"sentence": [f"{tag}{i}" for i in range(n)], "label": labels, "idx": list(range(n))},
            features=feats,
        )

    dsd = datasets.DatasetDict(
        {
            "train": split(4, "tr", [0, 1, 0, 1]),
            "validation": split(3, "va", [1, 0, 1]),
            "test": split(2, "te", [-1, -1]),  # glue hides test labels
        }
    )
    calls: list = []
    _fake_hub(monkeypatch, datasets, {("nyu-mll/glue", "sst2"): dsd}, calls)
    task = load_task("sst2", seed=None)
    assert calls[0][:2] == ("nyu-mll/glue", "sst2")
    assert [ex.fields for ex in task.validation] == [{"text": f"va{i}"} for i in range(3)]
    assert task.spec.format_query(task.train[0]) == "Sentence: tr0 Label:"


# ----------------------------------------------------------------------------- local files

ROWS = [
    {"text": "a gripping film", "label": 1, "split": "train"},
    {"text": "dull and long", "label": "Negative", "split": "train"},
    {"text": "warm, funny", "label": " Positive", "split": "train"},
    {"text": "a mess", "label": 0, "split": "train"},
    {"text": "lovely", "label": "positive", "split": "validation"},
    {"text": "boring", "label": 0, "split": "dev"},
]
LABELS_TRAIN, LABELS_VAL = [1, 0, 1, 0], [1, 0]


def _check_sst2(task: Task):
    assert task.spec is PAPER_TASKS["sst2"]
    assert [ex.label for ex in task.train] == LABELS_TRAIN
    assert [ex.label for ex in task.validation] == LABELS_VAL
    assert task.train[0].fields == {"text": "a gripping film"}
    assert task.info["source"] == "file"


def test_jsonl_with_split_column(tmp_path):
    p = tmp_path / "sst2.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    _check_sst2(load_task(p, seed=None))


def test_json_list_and_dict_of_splits(tmp_path):
    p = tmp_path / "SST-2.json"
    p.write_text(json.dumps(ROWS))
    _check_sst2(load_task(str(p), seed=None))
    by_split = {"train": [r for r in ROWS if r["split"] == "train"]}
    by_split["validation"] = [r for r in ROWS if r["split"] != "train"]
    p2 = tmp_path / "sst2.json"
    p2.write_text(json.dumps(by_split))
    _check_sst2(load_task(p2, seed=None))


def test_csv_with_int_like_strings_and_sentence_column(tmp_path):
    p = tmp_path / "sst2.csv"
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["sentence", "label", "split"])
        w.writeheader()
        for r in ROWS:
            w.writerow({"sentence": r["text"], "label": r["label"], "split": r["split"]})
    _check_sst2(load_task(p, seed=None))


def test_directory_with_train_and_validation_files(tmp_path):
    d = tmp_path / "cb"
    d.mkdir()
    rec = {"premise": "It rained.", "hypothesis": "The ground is wet"}
    (d / "train.jsonl").write_text(
        "\n".join(json.dumps({**rec, "label": lab}) for lab in (0, "False", 2))
    )
    with (d / "test.csv").open("w", newline="") as fh:  # test accepted as validation
        w = csv.DictWriter(fh, ["premise", "hypothesis", "label"])
        w.writeheader()
        w.writerow({**rec, "label": "Neither"})
    task = load_task(d)
    assert task.spec is PAPER_TASKS["cb"]
    assert [ex.label for ex in task.train] == [0, 1, 2]
    assert [ex.label for ex in task.validation] == [2]
    assert task.spec.format_demonstration(task.train[0]) == (
        "It rained. Question: The ground is wet. True, False, or Neither? Answer: True"
    )


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".tsv"])
def test_save_and_reload_round_trip(tmp_path, ext):
    spec = TaskSpec("mytask", "Q: {question} A:", (" no", " yes"))
    train = [Example({"question": f'q{i}, "quoted"\nline'}, i % 2) for i in range(6)]
    val = [Example({"question": f"v{i}"}, 1 - i % 2) for i in range(3)]
    task = Task(spec, train, val)
    path = save_task(task, tmp_path / f"out{ext}")
    back = load_task(path, spec=spec, seed=None)
    assert back.train == train and back.validation == val
    # without a spec: the default template and label words named by label_text
    back2 = load_task(path, template="Q: {question} A:", seed=None)
    assert back2.spec.label_words == (" no", " yes") and back2.train == train


def test_paper_task_round_trip_keeps_spec(tmp_path):
    spec = PAPER_TASKS["agnews"]
    train = [Example({"text": f"news {i}"}, i % 4) for i in range(8)]
    val = [Example({"text": f"val {i}"}, i % 4) for i in range(10)]
    path = save_task(Task(spec, train, val), tmp_path / "agnews.jsonl")
    back = load_task(path)  # defaults: shuffle with seed 1 and cap at 2000
    assert back.spec is spec and back.train == train
    assert back.validation == [val[i] for i in np.random.default_rng(1).permutation(10)]
    assert load_task(path, validation_limit=3).validation == back.validation[:3]


def test_default_spec_for_unknown_file_name(tmp_path):
    p = tmp_path / "reviews.jsonl"
    recs = [
        {"review": "great", "label": "pos", "split": "train"},
        {"review": "awful", "label": "neg", "split": "train"},
        {"review": "fine", "label": "pos", "split": "validation"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    task = load_task(p)
    assert task.spec.name == "reviews"
    assert task.spec.template == DEFAULT_TEMPLATE
    assert task.spec.label_words == (" neg", " pos")  # sorted label names
    assert [ex.label for ex in task.train] == [1, 0]
    assert task.spec.format_demonstration(task.train[0]) == "Input: great Label: pos"
    # caller's template / label words override
    t2 = load_task(p, template="Review: {text} Sentiment:", label_words=[" neg", " pos"])
    assert t2.spec.format_demonstration(t2.train[1]) == "Review: awful Sentiment: neg"
    with pytest.raises(ValueError, match="'pos' is not one of the label words"):
        load_task(p, label_words=[" bad", " good"])  # string labels must name a label word


def test_columns_mapping(tmp_path):
    p = tmp_path / "x.jsonl"
    recs = [
        {"body": "b0", "label": "a", "split": "train"},
        {"body": "b1", "label": "b", "split": "validation"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    task = load_task(p, columns={"text": "body"})
    assert task.train[0].fields == {"text": "b0"}


def test_local_file_errors(tmp_path):
    p = tmp_path / "nosplit.jsonl"
    p.write_text(json.dumps({"text": "x", "label": 0}))
    with pytest.raises(ValueError, match="cannot hold out 1 of 1 examples"):
        load_task(p, label_words=[" a", " b"])
    p.write_text(json.dumps({"text": "x", "label": 0, "split": "train"}) + '\n{"text": "y"}')
    with pytest.raises(ValueError, match="record 1: no 'split' value"):
        load_task(p, label_words=[" a", " b"])
    p = tmp_path / "sst2.jsonl"
    p.write_text(json.dumps({"text": "x", "label": 0, "split": "train"}))
    with pytest.raises(ValueError, match="no validation records"):
        load_task(p)
    p.write_text(
        "\n".join(
            json.dumps({"text": "x", "label": lab, "split": s})
            for lab, s in ((0, "train"), ("Meh", "validation"))
        )
    )
    with pytest.raises(ValueError, match=r"validation\] record 0: .*'Meh'"):
        load_task(p)
    p.write_text(
        "\n".join(json.dumps({"body": "x", "label": 0, "split": s}) for s in ("train", "dev"))
    )
    with pytest.raises(ValueError, match="needs a column 'text'"):
        load_task(p)
    ints = tmp_path / "ints.jsonl"
    ints.write_text(
        "\n".join(
            json.dumps({"text": "x", "label": i, "split": s})
            for i, s in ((0, "train"), (1, "validation"))
        )
    )
    with pytest.raises(ValueError, match="label_words="):
        load_task(ints)
    d = tmp_path / "emptydir"
    d.mkdir()
    with pytest.raises(ValueError, match="train.<ext> and validation.<ext>"):
        read_records(d)
    with pytest.raises(FileNotFoundError):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="not a paper task"):
        load_task("no-such-task")


def test_task_from_records():
    spec = PAPER_TASKS["subj"]
    task = task_from_records(
        [{"text": "the film runs 90 minutes", "label": "objective"}, {"text": "wow", "label": 1}],
        [{"sentence": "meh", "label": 1}],
        spec,
    )
    assert [ex.label for ex in task.train] == [0, 1]
    assert task.validation[0].fields == {"text": "meh"}
    assert task.info["source"] == "records"
    assert "train=2" in repr(task)


# ----------------------------------------------------------------------------- demonstrations


def _task(labels, name="toy", words=(" a", " b", " c")) -> Task:
    spec = TaskSpec(name, "x: {text} y:", words[: max(2, max(labels, default=0) + 1)])
    train = [Example({"text": f"t{i}"}, lab) for i, lab in enumerate(labels)]
    return Task(spec, train, train[:1])


def test_sampling_is_shuffle_with_seed_then_first_k():
    import datasets

    task = _task([i % 3 for i in range(50)])
    ds = datasets.Dataset.from_dict({"i": list(range(50))})
    for seed in (0, 1, 7, 123):
        demos = sample_demonstrations(task, 16, seed=seed)
        assert demos == sample_demonstrations(task, 16, seed=seed)  # deterministic
        perm = np.random.default_rng(seed).permutation(50)
        assert demos == [task.train[i] for i in perm[:16]]
        # ... which is the authors' datasets.Dataset.shuffle(seed=seed)
        assert demos == [task.train[i] for i in ds.shuffle(seed=seed)["i"][:16]]
        assert list(shuffled_indices(50, seed)) == list(perm)
    assert sample_demonstrations(task, 16, seed=0) != sample_demonstrations(task, 16, seed=1)
    # first k of a larger draw: the same prefix
    assert sample_demonstrations(task, 8, seed=3) == sample_demonstrations(task, 16, seed=3)[:8]
    assert sample_demonstrations(task, 0, seed=0) == []


def test_balanced_sampling_is_balanced_and_in_shuffled_order():
    labels = [0] * 40 + [1] * 8 + [2] * 12
    task = _task(labels)
    for seed in range(5):
        for k in (3, 7, 12, 20):
            demos = sample_demonstrations(task, k, seed=seed, balanced=True)
            assert len(demos) == k
            counts = [sum(ex.label == c for ex in demos) for c in range(3)]
            assert max(counts) - min(counts) <= 1, (seed, k, counts)
            pos = {id(task.train[i]): p for p, i in enumerate(shuffled_indices(60, seed))}
            assert [pos[id(ex)] for ex in demos] == sorted(pos[id(ex)] for ex in demos)
            # each class contributes its first examples in shuffled order
            for c in range(3):
                order = [task.train[i] for i in shuffled_indices(60, seed)]
                firsts = [ex for ex in order if ex.label == c][: counts[c]]
                assert [ex for ex in demos if ex.label == c] == firsts
    with pytest.warns(UserWarning, match="could not give every class"):
        demos = sample_demonstrations(task, 30, seed=0, balanced=True)
    assert [sum(ex.label == c for ex in demos) for c in range(3)] == [11, 8, 11]


def test_sampling_errors():
    with pytest.raises(ValueError, match="no train examples"):
        sample_demonstrations(_task([]), 4, seed=0)
    with pytest.raises(ValueError, match=r"single class, ' b' \(label 1\)"):
        sample_demonstrations(_task([1, 1, 1]), 2, seed=0)
    with pytest.raises(ValueError, match=r"k=10 .* has only 4 examples; use k <= 4"):
        sample_demonstrations(_task([0, 1, 0, 1]), 10, seed=0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        sample_demonstrations(_task([0, 1]), -1, seed=0)


def test_fit_to_context_drops_from_the_end():
    demos = [Example({"text": "x" * n}, 0) for n in (5, 3, 4, 2, 1)]
    fit = fit_to_context(demos, 20, lambda ex: len(ex.fields["text"]), query_budget=8)
    assert isinstance(fit, ContextFit)
    assert fit.demonstrations == demos[:3]  # 8 + 5 + 3 + 4 = 20 fits exactly
    assert (fit.k_requested, fit.k_effective, fit.n_dropped, fit.n_tokens) == (5, 3, 2, 20)
    assert fit.demo_tokens == (5, 3, 4)
    # a prefix is kept even if a later, shorter demonstration would still fit
    fit = fit_to_context(demos, 14, lambda ex: len(ex.fields["text"]), query_budget=8)
    assert fit.k_effective == 1
    assert fit_to_context(demos, 100, lambda ex: 1, 0).k_effective == 5
    with pytest.raises(ValueError, match="query alone needs 30"):
        fit_to_context(demos, 20, lambda ex: 1, query_budget=30)


def test_fit_to_context_skips_a_demonstration_too_long_even_alone():
    demos = [Example({"text": "x" * n}, 0) for n in (30, 3, 25, 4, 2)]
    with pytest.warns(UserWarning, match=r"demonstration 1 has 30 tokens, demonstration 3 has 25"):
        fit = fit_to_context(demos, 20, lambda ex: len(ex.fields["text"]), query_budget=8)
    assert fit.demonstrations == [demos[1], demos[3], demos[4]]  # 8 + 3 + 4 + 2 = 17
    assert fit.skipped == ((0, 30), (2, 25)) and (fit.k_requested, fit.k_effective) == (5, 3)


# ----------------------------------------------------------------------------- label words


@pytest.fixture(scope="module")
def small_tokenizer():
    """A GPT-2-style byte-level BPE trained on a few words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Label: Positive", "Label: Negative"] * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    pos, neg = (hf(w, add_special_tokens=False)["input_ids"] for w in (" Positive", " Negative"))
    assert len(pos) == 1 and len(neg) == 1
    return hf


def _spec(*words):
    return TaskSpec("lw", "Label: {text} Label:", words)


def test_label_words_single_tokens(small_tokenizer):
    ids = check_label_words(_spec(" Negative", " Positive"), small_tokenizer)
    enc = [
        small_tokenizer(w, add_special_tokens=False)["input_ids"]
        for w in (" Negative", " Positive")
    ]
    assert ids == enc and all(len(i) == 1 for i in ids)

    class Model:  # a TransformerLens model carries its tokenizer
        tokenizer = small_tokenizer

    assert check_label_words(_spec(" Negative", " Positive"), Model()) == ids


def test_label_words_multi_token(small_tokenizer):
    spec = _spec(" Negative", " Neutral")
    with pytest.raises(ValueError, match=r"' Neutral' -> \['ĠNe'=\d+, 'u'=") as info:
        check_label_words(spec, small_tokenizer)
    assert "' Negative'" not in str(info.value).split("but")[1].split(".")[0]
    ids = check_label_words(spec, small_tokenizer, require_single_token=False)
    assert len(ids[0]) == 1 and len(ids[1]) > 1


def test_label_words_shared_first_token(small_tokenizer):
    spec = _spec(" Positive", " Positively")
    with pytest.raises(ValueError, match=r"' Positive' and ' Positively' share .*'ĠPositive'"):
        check_label_words(spec, small_tokenizer, require_single_token=False)


def test_label_words_in_context(small_tokenizer):
    spec = _spec(" Negative", " Positive")
    alone = check_label_words(spec, small_tokenizer)
    assert check_label_words(spec, small_tokenizer, context="Label:") == alone
    with pytest.raises(ValueError, match="merges with the text before it"):
        check_label_words(_spec("itive", "ative"), small_tokenizer, context="Label: Pos")


def test_token_counters(small_tokenizer):
    spec = _spec(" Negative", " Positive")
    ex = Example({"text": "Positive"}, 1)
    count = demonstration_token_counter(spec, small_tokenizer)
    text = spec.format_demonstration(ex) + spec.separator
    assert count(ex) == len(small_tokenizer(text, add_special_tokens=False)["input_ids"])
    q = len(small_tokenizer(spec.format_query(ex), add_special_tokens=False)["input_ids"])
    assert query_token_budget(spec, [ex], small_tokenizer) == q + 1 + 1
    assert query_token_budget(spec, [ex], small_tokenizer, add_bos=False, include_label=False) == q


def test_hold_out_is_a_seeded_partition_of_the_pool():
    from icl_lens.data.records import hold_out

    pool = [Example({"text": f"t{i}"}, i % 3) for i in range(50)]
    train, val, info = hold_out(pool, size=0.2, seed=7)
    again = hold_out(pool, size=0.2, seed=7)
    other = hold_out(pool, size=0.2, seed=8)
    assert (len(train), len(val)) == (40, 10)
    assert info == {"holdout_size": 10, "holdout_seed": 7, "holdout_of": 50}
    assert [e.fields for e in again[1]] == [e.fields for e in val]  # same seed, same split
    assert [e.fields for e in other[1]] != [e.fields for e in val]
    names = sorted(e.fields["text"] for e in train + val)
    assert names == sorted(e.fields["text"] for e in pool)  # nothing lost or repeated
    assert [e.fields["text"] for e in train] == [e.fields["text"] for e in pool if e not in val]
    assert len(hold_out(pool, size=5, seed=0)[1]) == 5
    for bad in (0, 50, 1.0, 0.0):
        with pytest.raises(ValueError, match="hold out|fraction"):
            hold_out(pool, size=bad, seed=0)
