"""Adapted embedding tables: the lookup ``W'[ids]`` and the tied-head logits ``x W'^T``, without building W'.

An embedding table ``W0: (vocab, features)`` is a kernel whose input axis is the vocabulary (as PEFT
defines the DoRA norm of an embedding: over the vocabulary, one magnitude per feature), so its
adapter is ``A: (vocab, r)``, ``B: (r, features)``, ``m: (features,)`` (PEFT's ``lora_embedding_A``
and ``lora_embedding_B`` transposed). The lookup gathers rows of ``W0`` and ``A`` only:
``W'[ids] = (m / n) * (W0[ids] + s A[ids] B)``, with ``n = ||W0 + s A B||_c`` from
``factored_column_norm`` (an ``r x vocab x features`` product, no vocab x features temporary besides
W0). No dropout: PEFT has none on embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dora_jax.core.config import AdapterConfig
from dora_jax.core.dora import Adapter, column_scale


def lookup(
    ids: jax.Array | None,
    w0: jax.Array,
    adapter: Adapter,
    cfg: AdapterConfig,
    *,
    take: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``W'[ids]``: rows of the adapted table for integer ``ids`` of any shape, in ``w0``'s dtype.

    ``adapter`` is in matrix form (``KernelLayout.adapter_matrices``); a magnitude-only one has m alone.
    ``take(table)`` gathers the rows of a table of any width in place of ``jnp.take(table, ids, axis=0)``
    (``inject_fn`` passes the traced program's own gather).
    """
    take = take or (lambda table: jnp.take(table, ids, axis=0))
    rows = take(w0)
    if "a" in adapter:
        low = take(adapter["a"]).astype(w0.dtype) @ (cfg.scale * adapter["b"]).astype(w0.dtype)
        rows = rows + low
    scale = column_scale(w0, adapter, cfg)
    return rows if scale is None else rows * scale.astype(rows.dtype)


def attend(query: jax.Array, w0: jax.Array, adapter: Adapter, cfg: AdapterConfig) -> jax.Array:
    """``query @ W'^T`` (a head tied to the table): ``(q m/n) W0^T + s ((q m/n) B^T) A^T``."""
    scale = column_scale(w0, adapter, cfg)
    if scale is not None:
        query = query * scale.astype(query.dtype)
    logits = query @ w0.astype(query.dtype).T
    if "a" in adapter:
        low = query @ (cfg.scale * adapter["b"]).astype(query.dtype).T
        logits = logits + low @ adapter["a"].astype(query.dtype).T
    return logits
