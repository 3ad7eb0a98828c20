"""Deterministic synthetic sequence tasks: the offline data behind the default config.

A sequence is ``[BOS, x_1..x_L, SEP, y_1..y_L]`` over ``num_symbols`` digit tokens, where ``y``
is a function of ``x`` that names the task: ``copy`` (y = x), ``reverse``, ``shift`` (each
digit + 1 mod num_symbols) or ``sort``. The model is trained as a causal LM with the loss on the
``y`` tokens only. Batch ``i`` depends only on (seed, i), so an iterator's position is one
integer and any host can build its own rows of any batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dora_jax.errors import ConfigError

PAD, BOS, SEP = 0, 1, 2
FIRST_SYMBOL = 3
TASKS = ("copy", "reverse", "shift", "sort")
SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One task: ``name`` in TASKS, ``length`` digits per sequence, ``num_symbols`` digit tokens."""

    name: str
    length: int = 8
    num_symbols: int = 10

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ConfigError(f"synthetic task {self.name!r} is unknown; tasks: {list(TASKS)}")
        if self.length < 1 or self.num_symbols < 2:
            raise ConfigError(
                f"synthetic task needs length >= 1 and num_symbols >= 2; got {self.length}, {self.num_symbols}"
            )

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.num_symbols

    @property
    def seq_len(self) -> int:
        """Length of the model input (the full sequence minus its last token)."""
        return 2 * self.length + 1

    def answer(self, digits: np.ndarray) -> np.ndarray:
        """y for a (rows, length) array of digit values 0..num_symbols-1."""
        if self.name == "copy":
            return digits
        if self.name == "reverse":
            return digits[:, ::-1]
        if self.name == "shift":
            return (digits + 1) % self.num_symbols
        return np.sort(digits, axis=1)

    def rows(
        self, seed: int, index: int, batch_size: int, start: int = 0, stop: int | None = None, split: str = "train"
    ) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of batch ``index``: inputs, targets and loss_mask, each (rows, seq_len).

        The whole batch is drawn from one generator keyed by (seed, split, index), so every host
        that asks for its own rows sees the same batch as a single host would, and the eval split
        never repeats a training batch's stream.
        """
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        digits = rng.integers(0, self.num_symbols, size=(batch_size, self.length))[start:stop]
        rows = digits.shape[0]
        tokens = np.concatenate(
            [
                np.full((rows, 1), BOS),
                digits + FIRST_SYMBOL,
                np.full((rows, 1), SEP),
                self.answer(digits) + FIRST_SYMBOL,
            ],
            axis=1,
        ).astype(np.int32)
        loss_mask = np.zeros((rows, self.seq_len), np.float32)
        loss_mask[:, self.length + 1 :] = 1.0  # positions whose next token is an answer digit
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask}
