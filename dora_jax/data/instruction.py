"""Instruction tuning on LLM-Adapters-format files: tokenised, fixed-length, shuffled per epoch.

Each record becomes the official training prompt with its response, tokenised with the base
model's ``tokenizer.json`` (which adds BOS as the HF tokenizer does), an EOS appended when the
text is shorter than ``cutoff_len``, and truncated to ``cutoff_len`` tokens. The loss covers the
response tokens only (``train_on_inputs=False``) or the whole text. ``val_size`` records,
chosen by the seed, are held out for evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dora_jax.data import commonsense, sampling

PAD_ID = 0  # the official code pads with id 0 (unk); padded positions carry no loss
NO_LOSS_ROW = (np.zeros(1, np.int32), np.zeros(1, bool))  # fills the last batch of a finite set


def encode_all(
    records: list[dict[str, str]], tokenizer: Any, cutoff_len: int, eos_id: int | None, train_on_inputs: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss flags over those ids) of each record, as the official fine-tuning code builds them.

    Tokenises in batches (the ``tokenizers`` package runs them in parallel).
    """
    full = tokenizer.encode_batch([commonsense.prompt(r, train=True) for r in records])
    users = (
        []
        if train_on_inputs
        else tokenizer.encode_batch([commonsense.prompt({**r, "output": ""}, train=True) for r in records])
    )
    out = []
    for i, encoding in enumerate(full):
        ids = encoding.ids[:cutoff_len]
        if eos_id is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos_id):
            ids = ids + [eos_id]
        trained = np.ones(len(ids), bool) if train_on_inputs else np.arange(len(ids)) >= len(users[i].ids)
        out.append((np.asarray(ids, np.int32), trained))
    return out


def encode(record: dict[str, str], tokenizer: Any, cutoff_len: int, eos_id: int | None, train_on_inputs: bool):
    """(token ids, loss flags) of one record: ``encode_all`` of a single record."""
    return encode_all([record], tokenizer, cutoff_len, eos_id, train_on_inputs)[0]


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Right-padded next-token rows: inputs = ids[:-1], targets = ids[1:], loss where the target trains."""
    rows = len(examples)
    out = {
        "inputs": np.full((rows, seq_len), PAD_ID, np.int32),
        "targets": np.full((rows, seq_len), PAD_ID, np.int32),
        "loss_mask": np.zeros((rows, seq_len), np.float32),
    }
    for row, (ids, trained) in enumerate(examples):
        n = min(len(ids) - 1, seq_len)
        out["inputs"][row, :n] = ids[:n]
        out["targets"][row, :n] = ids[1 : n + 1]
        out["loss_mask"][row, :n] = trained[1 : n + 1]
    return out


@dataclasses.dataclass
class InstructionSource:
    """Batches of instruction records; batch ``i`` is a slice of the epoch-wise shuffled records.

    ``records`` are LLM-Adapters records (from a JSON file or a TFDS split); ``origin`` names
    where they came from, for error messages.
    """

    records: list[dict[str, str]]
    origin: str
    tokenizer: Any
    cutoff_len: int
    eos_id: int | None
    seed: int
    val_size: int
    train_on_inputs: bool
    eval_batch_size: int

    def __post_init__(self) -> None:
        records = self.records
        val, train = sampling.holdout(len(records), self.seed, self.val_size)
        encoded = encode_all(
            [records[i] for i in np.concatenate([val, train])],
            self.tokenizer,
            self.cutoff_len,
            self.eos_id,
            self.train_on_inputs,
        )
        self.val, self.train = encoded[: len(val)], encoded[len(val) :]
        if not self.train:
            raise commonsense.DataError(
                f"{self.origin}: {len(records)} records leave none for training after val_size={self.val_size}"
            )
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.seq_len = self.cutoff_len - 1

    def batch(
        self, index: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        items = sampling.batch_items(index, batch_size, len(self.train), self.seed, process_index, process_count)
        return pack_rows([self.train[i] for i in items], self.seq_len)

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        chunks = sampling.chunks(self.val, self.eval_batch_size, NO_LOSS_ROW)
        return [pack_rows(chunk, self.seq_len) for chunk in chunks]

    def epoch_steps(self, batch_size: int) -> int:
        return -(-len(self.train) // batch_size)
