"""Epoch-wise shuffled, host-sharded positions over a finite dataset: batch ``i`` depends on (seed, i) only."""

from __future__ import annotations

import numpy as np


def batch_items(
    index: int, batch_size: int, size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> list[int]:
    """This host's item indices of global batch ``index``; every epoch is a fresh permutation of ``size`` items."""
    rows = batch_size // process_count
    positions = np.arange(index * batch_size + process_index * rows, index * batch_size + (process_index + 1) * rows)
    epochs, offsets = np.divmod(positions, size)
    orders = {int(e): np.random.default_rng([seed, 3, int(e)]).permutation(size) for e in set(epochs)}
    return [int(orders[int(e)][o]) for e, o in zip(epochs, offsets, strict=True)]


def holdout(size: int, seed: int, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) indices: ``val_size`` items chosen by the seed, the rest for training."""
    order = np.random.default_rng([seed, 2]).permutation(size)
    return order[:val_size], order[val_size:]


def chunks(items: list, size: int, filler) -> list[list]:
    """``items`` in lists of ``size``, the last one completed with ``filler`` (rows that carry no loss)."""
    out = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        out.append(chunk + [filler] * (size - len(chunk)))
    return out
