"""Sentence(-pair) classification for encoders: GLUE-style TFDS splits or local JSON / JSON Lines files.

A file record is ``{"text": str, "label": int}`` with an optional ``"text_pair": str`` (e.g.
``{"text": "a gripping film", "label": 1}``). Texts are tokenised with the encoder's
``tokenizer.json`` (which adds ``[CLS]`` / ``[SEP]`` and the segment ids of a pair), truncated to
``max_len`` tokens (longest text first, as HF does) and right-padded. A batch holds ``inputs``,
``attention_mask``, ``token_type_ids``, ``labels`` and ``loss_mask`` (1 for real rows, 0 for the
rows that fill the last evaluation batch).
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
from typing import Any

import numpy as np

from dora_jax.data import sampling, tfds_source
from dora_jax.data.records import DataError, read_records

# TFDS name (without version) -> (text fields, label field, number of labels).
TFDS_TASKS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "glue/sst2": (("sentence",), "label", 2),
    "glue/cola": (("sentence",), "label", 2),
    "glue/mrpc": (("sentence1", "sentence2"), "label", 2),
    "glue/qqp": (("question1", "question2"), "label", 2),
    "glue/qnli": (("question", "sentence"), "label", 2),
    "glue/rte": (("sentence1", "sentence2"), "label", 2),
    "glue/mnli": (("premise", "hypothesis"), "label", 3),
    "bool_q": (("question", "passage"), "answer", 2),
}


def load_file(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The validated records of a JSON list or JSON Lines file; errors name the file, record and field."""
    path = pathlib.Path(path)
    records = read_records(path)
    for index, record in enumerate(records):
        _check(record, f"{path}: record {index}")
    return records


def _check(record: Any, place: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{place} is {type(record).__name__}, not an object with 'text' and 'label'")
    for field, kinds, required in (("text", str, True), ("text_pair", str, False), ("label", int, True)):
        if field not in record:
            if required:
                raise DataError(f"{place} has no field {field!r} (fields: {sorted(record)})")
            continue
        value = record[field]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise DataError(f"{place} field {field!r} is {type(value).__name__}, not {kinds.__name__}")
    if record["label"] < 0:
        raise DataError(f"{place} field 'label' is {record['label']}: labels are 0, 1, ...")


def load_tfds(name: str, split: str, data_dir: str = "", limit: int = 0) -> list[dict[str, Any]]:
    """The records of a GLUE-style TFDS split (``glue/sst2``, ``bool_q``, ...) in the file format."""
    key = tfds_source.base_name(name)
    if key not in TFDS_TASKS:
        raise DataError(f"TFDS dataset {name!r} has no classification fields; supported: {sorted(TFDS_TASKS)}")
    fields, label_field, _ = TFDS_TASKS[key]
    examples = tfds_source.load_split(name, split, data_dir, limit)
    records = []
    for i in range(len(examples)):
        example = examples[i]
        record = {"text": tfds_source.text(example[fields[0]]), "label": int(np.asarray(example[label_field]))}
        if len(fields) > 1:
            record["text_pair"] = tfds_source.text(example[fields[1]])
        _check(record, f"TFDS {name} split {split} example {i}")
        records.append(record)
    return records


QUESTION = re.compile(r"question:\s*(.*?)\s*\n\s*\nAnswer format", re.DOTALL)


def boolq_questions(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The BoolQ records of an LLM-Adapters file (``boolq/train.json``) as classification records:
    the question alone as ``text``, ``label`` 1 for "true" and 0 for "false" (no passage)."""
    from dora_jax.data import commonsense

    out = []
    for index, record in enumerate(commonsense.load(path)):
        found = QUESTION.search(record["instruction"])
        if found is None or record.get("answer") not in ("true", "false"):
            raise DataError(f"{path}: record {index} is not a BoolQ record (a question and a true/false answer)")
        out.append({"text": found.group(1), "label": int(record["answer"] == "true")})
    return out


def num_labels(name: str) -> int:
    """Number of labels of a supported TFDS classification dataset."""
    return TFDS_TASKS[tfds_source.base_name(name)][2]


def encode_all(records: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, segment ids) of each record: ``[CLS] text [SEP] (text_pair [SEP])`` cut to ``max_len``."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len, strategy="longest_first")
    singles = [i for i, r in enumerate(records) if "text_pair" not in r]
    pairs = [i for i, r in enumerate(records) if "text_pair" in r]
    out: list[Any] = [None] * len(records)
    for indices, inputs in (
        (singles, [records[i]["text"] for i in singles]),
        (pairs, [(records[i]["text"], records[i]["text_pair"]) for i in pairs]),
    ):
        for i, encoding in zip(indices, tokenizer.encode_batch(inputs) if inputs else [], strict=True):
            out[i] = (encoding.ids, encoding.type_ids)
    return out


def pack_rows(
    examples: list[tuple[list[int], list[int], int, bool]], max_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded rows of (ids, segment ids, label, counts) examples."""
    rows = len(examples)
    out = {
        "inputs": np.full((rows, max_len), pad_id, np.int32),
        "attention_mask": np.zeros((rows, max_len), np.int32),
        "token_type_ids": np.zeros((rows, max_len), np.int32),
        "labels": np.zeros((rows,), np.int32),
        "loss_mask": np.zeros((rows,), np.float32),
    }
    for row, (ids, types, label, counts) in enumerate(examples):
        n = len(ids)
        out["inputs"][row, :n], out["attention_mask"][row, :n], out["token_type_ids"][row, :n] = ids, 1, types
        out["labels"][row], out["loss_mask"][row] = label, float(counts)
    return out


def check_labels(records: list[dict[str, Any]], num_labels: int, origin: str) -> None:
    """Every label must be one the classifier has."""
    for index, record in enumerate(records):
        if record["label"] >= num_labels:
            raise DataError(
                f"{origin}: record {index} has label {record['label']}, "
                f"but model.num_labels={num_labels} (labels 0..{num_labels - 1})"
            )


def labelled_rows(records: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[tuple[Any, ...]]:
    """(token ids, segment ids, label, counts) of each record, ready for ``pack_rows``."""
    encoded = encode_all(records, tokenizer, max_len)
    return [(ids, types, r["label"], True) for (ids, types), r in zip(encoded, records, strict=True)]


def pad_id(tokenizer: Any) -> int:
    """The id rows are right-padded with: the tokenizer's ``[PAD]``, else 0."""
    pad = tokenizer.token_to_id("[PAD]")
    return 0 if pad is None else pad


def padded_batches(
    rows: list[tuple[Any, ...]], batch_size: int, max_len: int, pad_id: int
) -> list[dict[str, np.ndarray]]:
    """``rows`` in batches of ``batch_size``; the last is completed with rows that count for nothing."""
    filler = ([pad_id], [0], 0, False)
    return [pack_rows(chunk, max_len, pad_id) for chunk in sampling.chunks(rows, batch_size, filler)]


@dataclasses.dataclass
class ClassificationSource:
    """Batches of labelled texts; batch ``i`` is a slice of the epoch-wise shuffled training records."""

    records: list[dict[str, Any]]
    origin: str
    tokenizer: Any
    max_len: int
    num_labels: int
    seed: int
    val_size: int
    eval_batch_size: int

    def __post_init__(self) -> None:
        check_labels(self.records, self.num_labels, self.origin)
        val, train = sampling.holdout(len(self.records), self.seed, self.val_size)
        if not len(train):
            raise DataError(
                f"{self.origin}: {len(self.records)} records leave none for training after val_size={self.val_size}"
            )
        encoded = labelled_rows([self.records[i] for i in np.concatenate([val, train])], self.tokenizer, self.max_len)
        self.val, self.train = encoded[: len(val)], encoded[len(val) :]
        self.pad_id = pad_id(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.seq_len = self.max_len

    def batch(
        self, index: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        items = sampling.batch_items(index, batch_size, len(self.train), self.seed, process_index, process_count)
        return pack_rows([self.train[i] for i in items], self.max_len, self.pad_id)

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        return padded_batches(self.val, self.eval_batch_size, self.max_len, self.pad_id)

    def epoch_steps(self, batch_size: int) -> int:
        return -(-len(self.train) // batch_size)
