"""Local task files as users write them (issue 14, items 4 and 13): one labelled file
without a split column, Excel's byte-order mark, non-UTF-8 bytes, short CSV rows, and
label words that no example uses or that start with a bare space."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from icl_lens.data.local_files import HOLDOUT_SEED
from icl_lens.data.task_sources import load_task
from icl_lens.data.tasks import TaskSpec, check_label_words


def write_unsplit(path, n=20):
    rows = [{"text": f"t{i}", "label": ["bad", "good"][i % 2]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_file_without_split_column_gets_a_seeded_held_out_validation_split(tmp_path):
    path = write_unsplit(tmp_path / "reviews.jsonl")
    task = load_task(path, seed=None, validation_limit=None)
    assert (len(task.train), len(task.validation)) == (16, 4)
    info = task.info
    assert (info["holdout_size"], info["holdout_seed"], info["holdout_of"]) == (4, HOLDOUT_SEED, 20)
    assert "4 of 20 records, fraction 0.2, seed 0" in info["validation_split"]
    texts = {ex.fields["text"] for ex in task.train + task.validation}
    assert texts == {f"t{i}" for i in range(20)}  # a partition: nothing lost, nothing twice
    train_texts = [ex.fields["text"] for ex in task.train]
    assert train_texts == sorted(train_texts, key=lambda t: int(t[1:]))  # file order kept
    again = load_task(path, seed=None, validation_limit=None)
    assert [ex.fields for ex in again.validation] == [ex.fields for ex in task.validation]
    half = load_task(path, validation_fraction=0.5)
    assert (len(half.train), half.info["n_validation_total"]) == (10, 10)


def test_csv_with_excel_byte_order_mark_reads_its_header(tmp_path):
    path = tmp_path / "excel.csv"
    rows = "".join(f"t{i},{['bad', 'good'][i % 2]}\r\n" for i in range(10))
    path.write_bytes(b"\xef\xbb\xbftext,label\r\n" + rows.encode())
    task = load_task(path)
    assert set(task.train[0].fields) == {"text"}  # not '\ufefftext'
    assert task.info["holdout_of"] == 10
    assert task.spec.label_words == (" bad", " good")


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".json"])
def test_non_utf8_input_names_the_file_and_line(tmp_path, ext):
    path = tmp_path / f"latin1{ext}"
    lines = {
        ".jsonl": ['{"text": "ok", "label": "a"}', '{"text": "ok", "label": "b"}'],
        ".csv": ["text,label", "ok,a"],
        ".json": ["[", '{"text": "ok", "label": "a"},'],
    }[ext]
    bad_line = '{"text": "caf\u00e9", "label": "b"}' if ext != ".csv" else "caf\u00e9,b"
    path.write_bytes(("\n".join([*lines, bad_line]) + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"latin1\{ext}:3: not UTF-8 text \(byte 0xe9\)"):
        load_task(path)


def test_csv_rows_with_missing_or_extra_fields_name_the_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label,split\nt0,bad,train\nt1,good\nt2,bad,validation\n")
    with pytest.raises(
        ValueError, match=r"short\.csv:3: the row has 2 fields, the header 3: no value for split"
    ):
        load_task(path)
    path.write_text("text,label,split\nt0,bad,train\nt1, so good,really,validation\n")
    with pytest.raises(
        ValueError, match=r"short\.csv:3: the row has more fields than the header's 3"
    ):
        load_task(path)


def test_label_words_that_no_example_uses_are_named(tmp_path):
    path = write_unsplit(tmp_path / "two_classes.jsonl")
    unused = r"label words \[' meh'\] are used by no example \(2 of 3"
    with pytest.warns(UserWarning, match=unused):
        load_task(path, label_words=[" bad", " good", " meh"])


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE that knows ' Positive' and ' Negative' as single tokens, and
    starts any other word with a bare 'Ġ' (space) token."""
    from tokenizers import decoders, trainers

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
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_label_words_starting_with_a_bare_space_token_are_named():
    spec = TaskSpec("t", "Label: {text} Label:", (" Negative", " Zq"))
    with pytest.warns(UserWarning, match=r"bare space token: ' Zq' -> \['Ġ'="):
        ids = check_label_words(spec, bpe_tokenizer(), require_single_token=False)
    assert len(ids[0]) == 1 and len(ids[1]) > 1


def test_a_label_word_that_is_the_unknown_token_is_refused():
    vocab = {"<unk>": 0, "<bos>": 1, "good": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")
    spec = TaskSpec("t", "{text} Label:", (" good", " Negative"))
    with pytest.raises(ValueError, match="' Negative' is not in the tokenizer's vocabulary"):
        check_label_words(spec, hf)
