"""Alpaca templating, label masking and packing (pipeline/data.py) with the stories260K tokenizer."""
import json

import pytest
from datasets import DatasetDict

from pipeline.config import PrepareDataConfig
from pipeline.data import (IGNORE, PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt, prepare_alpaca,
                           load_prepared, read_alpaca_rows, save_prepared, tokenize_row)
from pipeline.io import DataFileError
from pipeline.params import ConfigError
from pipeline.teacher import load_tokenizer
from tests.helpers import make_rows, write_jsonl

SEQ = 16


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    return load_tokenizer(str(stories_path))


def cut(rows, tokenizer, seq_len=SEQ):
    """The reference packing: concatenate in order, cut, drop the remainder and prompt-only chunks."""
    ids, labels = [], []
    for row in rows:
        row_ids, row_labels = tokenize_row(row, tokenizer)
        ids += row_ids
        labels += row_labels
    chunks = [(ids[i:i + seq_len], labels[i:i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return [c for c in chunks if any(label != IGNORE for label in c[1])]


def test_prompt_templates_are_the_stanford_strings():
    with_input = format_prompt({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert with_input == PROMPT_WITH_INPUT.format(instruction="Add.", input="1 and 2")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    without = format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input:" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_prompt_tokens_are_masked_and_response_plus_eos_labelled(tokenizer):
    for row in make_rows(2):
        ids, labels = tokenize_row(row, tokenizer)
        prompt = tokenizer(format_prompt(row))["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        assert prompt[0] == tokenizer.bos_token_id  # a Llama tokenizer adds BOS itself
        assert ids == prompt + response + [tokenizer.eos_token_id]
        assert labels[:len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]
        assert tokenizer.decode(labels[len(prompt):-1]) == row["output"]


def test_validation_is_the_first_rows_and_train_the_rest_packed(tokenizer):
    rows = make_rows(12)
    cfg = PrepareDataConfig(seq_len=SEQ, val_rows=3, max_train_tokens=None, max_val_tokens=None)
    prepared = prepare_alpaca(iter(rows), tokenizer, cfg)
    for split, part in (("validation", rows[:3]), ("train", rows[3:])):
        expected = cut(part, tokenizer)
        got = prepared.dataset[split]
        assert got["input_ids"] == [c[0] for c in expected]
        assert got["labels"] == [c[1] for c in expected]
        assert all(len(x) == SEQ for x in got["input_ids"])
    stream = sum(len(tokenize_row(r, tokenizer)[0]) for r in rows[3:])
    assert stream % SEQ != 0, "the fixture should leave a remainder to drop"
    m = prepared.metrics
    assert m["train_rows"] == 9 and m["val_rows"] == 3
    assert m["train_tokens"] == m["train_chunks"] * SEQ == len(prepared.dataset["train"]) * SEQ
    labelled = sum(label != IGNORE for chunk in prepared.dataset["train"]["labels"] for label in chunk)
    assert m["train_response_token_frac"] == pytest.approx(labelled / m["train_tokens"])


def test_chunks_with_only_prompt_tokens_are_dropped(tokenizer):
    long_input = {"instruction": "Read this.", "input": "the sun is warm and the sky is blue " * 20,
                  "output": "Yes."}
    rows = make_rows(2) + [long_input] + make_rows(4)
    cfg = PrepareDataConfig(seq_len=SEQ, val_rows=1, max_train_tokens=None, max_val_tokens=None)
    prepared = prepare_alpaca(iter(rows), tokenizer, cfg)
    expected = cut(rows[1:], tokenizer)
    assert prepared.dataset["train"]["input_ids"] == [c[0] for c in expected]
    assert prepared.metrics["train_prompt_only_chunks_dropped"] >= 3
    assert all(any(label != IGNORE for label in chunk) for chunk in prepared.dataset["train"]["labels"])


def test_token_caps_keep_the_first_whole_chunks_and_stop_reading(tokenizer):
    rows = make_rows(40)
    consumed = []

    def counted():
        for row in rows:
            consumed.append(row)
            yield row

    cfg = PrepareDataConfig(seq_len=SEQ, val_rows=4, max_train_tokens=2 * SEQ + SEQ // 2, max_val_tokens=SEQ)
    prepared = prepare_alpaca(counted(), tokenizer, cfg)
    train, val = prepared.dataset["train"], prepared.dataset["validation"]
    assert len(train) == 2 and len(val) == 1  # floor(cap / seq_len) chunks
    assert train["input_ids"] == [c[0] for c in cut(rows[4:], tokenizer)[:2]]
    assert val["input_ids"] == [cut(rows[:4], tokenizer)[0][0]]
    assert prepared.metrics["train_tokens"] == 2 * SEQ
    assert len(consumed) < 10, "tokenizing should stop once the capped chunks are full"
    assert prepared.metrics["train_rows"] == len(consumed) - 4


def test_too_little_data_for_one_chunk_fails(tokenizer):
    cfg = PrepareDataConfig(seq_len=4096, val_rows=1, max_train_tokens=None, max_val_tokens=None)
    with pytest.raises(ValueError, match="split has no chunk of 4096 tokens"):
        prepare_alpaca(iter(make_rows(3)), tokenizer, cfg)


def test_local_jsonl_source_and_missing_file(tmp_path):
    rows = make_rows(3)
    assert list(read_alpaca_rows(write_jsonl(tmp_path / "a.jsonl", rows))) == rows
    with pytest.raises(ConfigError, match=r"^prepare-data\.source: no such file"):
        read_alpaca_rows(str(tmp_path / "missing.jsonl"))


GOOD_LINE = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})
BAD_FILES = [  # (file text, the error after the path)
    (f"{GOOD_LINE}\n\n" + '{"instruction": "x", "output": "y",, }\n',
     "not valid JSON, Expecting property name enclosed in double quotes at column 36 (line 3)"),
    (f"{GOOD_LINE}\n" + json.dumps(["instruction", "output"]) + "\n",
     "expected an object with string fields instruction and output, got '[\"instruction\", \"output\"]' (line 2)"),
    (json.dumps({"instruction": "x"}) + "\n",
     "expected an object with string fields instruction and output, got '{\"instruction\": \"x\"}' (line 1)"),
    ("", "holds no rows (empty file)"),
    ("\n  \n", "holds no rows (empty file)"),
]


@pytest.mark.parametrize("text, message", BAD_FILES, ids=["malformed", "not-an-object", "no-output", "empty", "blank"])
def test_a_bad_jsonl_file_is_named_with_the_line_at_fault(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataFileError) as caught:
        list(read_alpaca_rows(str(path)))
    assert str(caught.value) == f"{path}: {message}"



def test_prepared_data_round_trips_and_foreign_folders_are_refused(tmp_path, tokenizer):
    cfg = PrepareDataConfig(seq_len=SEQ, val_rows=2, max_train_tokens=None, max_val_tokens=None)
    dataset = prepare_alpaca(iter(make_rows(10)), tokenizer, cfg).dataset
    save_prepared(dataset, tmp_path / "prepared")
    loaded = load_prepared(tmp_path / "prepared")
    assert loaded["train"]["labels"] == dataset["train"]["labels"]
    save_prepared(DatasetDict(train=dataset["train"]), tmp_path / "other")
    with pytest.raises(ValueError, match="not a prepare-data out"):
        load_prepared(tmp_path / "other")


def test_a_hub_source_is_pinned_by_its_revision_and_read_at_it(monkeypatch):
    import huggingface_hub

    from pipeline import data
    from pipeline.source import source_identity

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"^prepare-data.source: 'yahma/alpaca-cleaned' is neither a .jsonl file nor "
                                          r"reachable: the hub is offline \(HF_HUB_OFFLINE\)"):
        source_identity("yahma/alpaca-cleaned")
    asked = {}
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: asked.update(args=args, **kwargs) or [])
    list(data.read_alpaca_rows("yahma/alpaca-cleaned", "abc123"))
    assert asked == {"args": ("yahma/alpaca-cleaned",), "split": "train", "revision": "abc123"}
