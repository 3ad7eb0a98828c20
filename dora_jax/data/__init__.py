"""Data sources behind one small interface: host-sharded, deterministic batches with a resumable position.

A source gives ``batch(index, batch_size, process_index, process_count)``: this host's rows of
global batch ``index`` as numpy arrays (``inputs``, ``targets``, ``loss_mask``, each
(rows, seq_len)). A batch depends only on the seed and its index, so the iterator position saved
in a checkpoint is the next index.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Protocol

import numpy as np

from dora_jax.data.synthetic import SyntheticTask
from dora_jax.errors import ConfigError

SOURCES = ("synthetic", "instruction", "tfds", "classification")


class Source(Protocol):
    vocab_size: int
    seq_len: int

    def batch(
        self, index: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]: ...

    def eval_batches(self) -> list[dict[str, np.ndarray]]: ...


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Batches of a SyntheticTask; evaluation uses its own stream of held-out batches."""

    task: SyntheticTask
    seed: int
    eval_count: int = 4
    eval_batch_size: int = 128

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    @property
    def seq_len(self) -> int:
        return self.task.seq_len

    def batch(
        self, index: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        rows = batch_size // process_count
        return self.task.rows(self.seed, index, batch_size, process_index * rows, (process_index + 1) * rows)

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        return [self.task.rows(self.seed, i, self.eval_batch_size, split="eval") for i in range(self.eval_count)]


def is_classification(source: Source) -> bool:
    """Whether batches hold labelled texts for a classifier (not next-token targets)."""
    from dora_jax.data.classification import ClassificationSource

    return isinstance(source, ClassificationSource)


def eos_id(directory: pathlib.Path) -> int | None:
    """The EOS token id a model directory's config.json or generation_config.json names."""
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return int(eos[0] if isinstance(eos, list) else eos)
    return None


def tokenizer_dir(config: Any) -> pathlib.Path:
    """data.tokenizer_dir, else the base model's directory (which must then be set)."""
    from dora_jax.run_config import require_path

    data = config.data
    key, directory = (
        ("data.tokenizer_dir", data.tokenizer_dir) if data.tokenizer_dir else ("model.hf_dir", config.model.hf_dir)
    )
    return pathlib.Path(require_path(key, "" if directory == "random" else directory))


def _classification_source(config: Any) -> Source:
    from dora_jax.data import classification
    from dora_jax.io import load_tokenizer

    data = config.data
    if config.model.num_labels <= 0:
        raise ConfigError("data.source='classification' needs model.num_labels > 0 (e.g. 2 for glue/sst2)")
    tokenizer = load_tokenizer(tokenizer_dir(config))  # paths are checked before any data is read
    if data.tfds_name:
        records = classification.load_tfds(data.tfds_name, data.tfds_split, data.tfds_data_dir)
        origin = f"TFDS {data.tfds_name} split {data.tfds_split}"
    elif data.path:
        records, origin = classification.load_file(data.path), data.path
    else:
        raise ConfigError("data.source='classification' needs data.path (a JSON/JSONL file) or data.tfds_name")
    return classification.ClassificationSource(
        records,
        origin,
        tokenizer,
        data.cutoff_len,
        config.model.num_labels,
        config.seed,
        data.val_size,
        data.eval_batch_size,
    )


def make_source(config: Any) -> Source:
    """The source a run's ``config.data`` names."""
    data = config.data
    if data.source not in SOURCES:
        raise ConfigError(f"data.source {data.source!r} is unknown; sources: {list(SOURCES)}")
    if data.source == "classification":
        return _classification_source(config)
    if data.source in ("instruction", "tfds"):
        from dora_jax.data import commonsense, tfds_source
        from dora_jax.data.instruction import InstructionSource
        from dora_jax.io import load_tokenizer
        from dora_jax.run_config import require_path

        if data.source == "tfds":
            name = require_path("data.tfds_name", data.tfds_name)
            records = tfds_source.load_records(name, data.tfds_split, data.tfds_data_dir)
            origin = f"TFDS {name} split {data.tfds_split}"
        else:
            origin = require_path("data.path", data.path)
            records = commonsense.load(origin)
        directory = tokenizer_dir(config)
        return InstructionSource(
            records,
            origin,
            load_tokenizer(directory),
            data.cutoff_len,
            eos_id(directory),
            config.seed,
            data.val_size,
            data.train_on_inputs,
            data.eval_batch_size,
        )
    synthetic = SyntheticTask(data.task, data.length, data.num_symbols)
    return SyntheticSource(synthetic, config.seed, data.eval_batches, data.eval_batch_size)
