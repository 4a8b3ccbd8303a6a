"""Alpaca → packed chunks of next-token targets (../shared/design/lolcats.md §2 Data).

Each row becomes the Stanford Alpaca prompt (with or without "### Input:") followed by its response.
The prompt is tokenized with the tokenizer's own special tokens (`add_special_tokens=True`): Llama
tokenizers prepend BOS as upstream does, SmolLM2's tokenizer adds nothing, so its chunks carry no
BOS. The response is tokenized without special tokens and the tokenizer's EOS id is appended
(`</s>` for Llama, `<|im_end|>` for SmolLM2-Instruct, its end of turn). Labels equal input_ids
except on prompt tokens (-100); the shift to next-token targets happens in the loss, as in
transformers. Rows 0..val_rows-1 form validation, the rest train; each split is one stream of its
rows in order, cut into seq_len chunks (no document masking, remainder dropped, chunks whose labels
are all -100 dropped). A token cap keeps the first floor(cap / seq_len) such chunks and stops
tokenizing once they are full. Shapes: every saved row is T = seq_len tokens.
"""
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset, load_from_disk
from tqdm import tqdm

from .config import PrepareDataConfig
from .io import DataFileError, atomic_dir
from .params import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
COLUMNS = ("input_ids", "labels")

IGNORE = -100  # label of a token the loss skips (torch cross_entropy's ignore_index)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

Row = Mapping[str, str]


def is_local(source: str) -> bool:
    """A `prepare-data.source` that is a local file, not a hub dataset id."""
    return source.endswith(".jsonl")


def read_alpaca_rows(source: str, revision: str | None = None) -> Iterator[Row]:
    """Rows of a local .jsonl file, or of a hub dataset's train split (at `revision`, if given); a
    missing file fails now."""
    if not is_local(source):
        return iter(load_dataset(source, split="train", revision=revision))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"prepare-data.source: no such file {source!r} (relative to {os.getcwd()})")
    return _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """Each non-blank line as one row; a line that is not an Alpaca row fails naming the file and line."""
    rows = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip())
            except json.JSONDecodeError as e:  # its own line number counts within `line` only
                raise DataFileError(f"{path}: not valid JSON, {e.msg} at column {e.colno} (line {line_no})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                    or not isinstance(row.get("output"), str):
                raise DataFileError(f"{path}: expected an object with string fields instruction and output, "
                                    f"got {line.strip()[:60]!r} (line {line_no})")
            rows += 1
            yield row
    if rows == 0:
        raise DataFileError(f"{path}: holds no rows (empty file)")


def format_prompt(row: Row) -> str:
    template = PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def tokenize_row(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row: prompt with special tokens, then response + EOS labelled."""
    prompt = tokenizer(format_prompt(row), add_special_tokens=True)["input_ids"]
    response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE] * len(prompt) + response


@dataclass
class Packer:
    """Concatenates rows and cuts seq_len chunks, keeping at most max_chunks with a labelled token."""

    seq_len: int
    max_chunks: int | None = None
    rows: int = 0  # rows fed in (the last one may be only partly used)
    prompt_only_chunks: int = 0  # chunks dropped because every label was -100
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list, repr=False)  # tokens not yet in a chunk
    _labels: list[int] = field(default_factory=list, repr=False)

    @property
    def full(self) -> bool:
        return self.max_chunks is not None and len(self.input_ids) >= self.max_chunks

    def add(self, ids: list[int], labels: list[int]) -> None:
        self.rows += 1
        self._ids += ids
        self._labels += labels
        while len(self._ids) >= self.seq_len and not self.full:
            chunk_ids, chunk_labels = self._ids[:self.seq_len], self._labels[:self.seq_len]
            del self._ids[:self.seq_len], self._labels[:self.seq_len]
            if all(label == IGNORE for label in chunk_labels):
                self.prompt_only_chunks += 1
            else:
                self.input_ids.append(chunk_ids)
                self.labels.append(chunk_labels)

    def dataset(self) -> Dataset:
        features = Features({name: List(Value("int32"), length=self.seq_len) for name in COLUMNS})
        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels}, features=features)

    def metrics(self, split: str) -> dict[str, float]:
        tokens = len(self.input_ids) * self.seq_len
        labelled = sum(label != IGNORE for chunk in self.labels for label in chunk)
        return {f"{split}_rows": self.rows, f"{split}_chunks": len(self.input_ids), f"{split}_tokens": tokens,
                f"{split}_prompt_only_chunks_dropped": self.prompt_only_chunks,
                f"{split}_response_token_frac": labelled / tokens if tokens else 0.0}


@dataclass
class PreparedData:
    dataset: DatasetDict  # "train" and "validation", columns input_ids and labels, T = seq_len each
    metrics: dict[str, float]


def _max_chunks(cap: int | None, seq_len: int) -> int | None:
    return None if cap is None else cap // seq_len  # floor: never more tokens than the cap


def prepare_alpaca(rows: Iterable[Row], tokenizer, cfg: PrepareDataConfig) -> PreparedData:
    """Template, tokenize and pack `rows` in order into validation (first val_rows) and train."""
    val = Packer(cfg.seq_len, _max_chunks(cfg.max_val_tokens, cfg.seq_len))
    train = Packer(cfg.seq_len, _max_chunks(cfg.max_train_tokens, cfg.seq_len))
    for index, row in enumerate(tqdm(rows, desc="alpaca rows", unit="row", mininterval=5)):
        packer = val if index < cfg.val_rows else train
        if not packer.full:  # a full validation split skips its remaining rows untokenized
            packer.add(*tokenize_row(row, tokenizer))
        if train.full:
            break
    for split, packer in (("train", train), ("val", val)):
        if not packer.input_ids:
            raise ValueError(f"prepare-data: the {split} split has no chunk of {cfg.seq_len} tokens "
                             f"with a response token ({packer.rows} rows read)")
    metrics = {**train.metrics("train"), **val.metrics("val")}
    log.info("prepared %s", metrics)
    return PreparedData(DatasetDict(train=train.dataset(), validation=val.dataset()), metrics)



def save_prepared(dataset: DatasetDict, out: str | Path) -> None:
    """`save_to_disk` into a temp folder that then replaces `out` (the prepare-data out)."""
    with atomic_dir(out) as tmp:
        dataset.save_to_disk(str(tmp))


def chunk_length(data: DatasetDict) -> int:
    """Tokens per prepared chunk: every row of every split holds seq_len of them."""
    return len(data["train"][0]["input_ids"])


def load_prepared(path: str | Path) -> DatasetDict:
    """prepare-data's out, checked: splits train/validation, columns input_ids/labels."""
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, DatasetDict) or set(dataset) != set(SPLITS) or any(
            dataset[split].column_names != list(COLUMNS) for split in SPLITS):
        raise ValueError(f"{path}: not a prepare-data out (splits {SPLITS}, columns {COLUMNS})")
    return dataset
