"""Greedy decoding for the Llama family, with or without the key/value cache.

``forward(ids, **kwargs)`` is the model's apply with its params bound, e.g.
``lambda ids, **kw: model.apply({"params": params}, ids, **kw)`` or an ``inject``-adapted one.
Prompts are left-padded (``prompt_mask`` 0 on padding); rotary positions count real tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax.models.llama import LlamaConfig, init_cache


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def greedy(
    forward: Callable[..., Any],
    config: LlamaConfig,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    use_cache: bool = True,
    cache_dtype: Any = jnp.float32,
) -> jax.Array:
    """The ``max_new_tokens`` most likely next tokens, one at a time: (batch, max_new_tokens)."""
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = _positions(mask)
    if not use_cache:
        ids = prompt_ids
        for step in range(max_new_tokens):
            length = prompt_len + step
            logits = forward(ids, attention_mask=mask[:, :length], position_ids=positions[:, :length])
            ids = jnp.concatenate([ids, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(ids.dtype)], axis=1)
        return ids[:, prompt_len:]

    @jax.jit
    def step(ids, cache, index):
        logits, cache = forward(
            ids,
            attention_mask=mask,
            position_ids=jax.lax.dynamic_slice_in_dim(positions, index, ids.shape[1], axis=1),
            cache=cache,
            cache_index=index,
        )
        return jnp.argmax(logits[:, -1], axis=-1).astype(prompt_ids.dtype), cache

    token, cache = step(prompt_ids, init_cache(config, batch, total, cache_dtype), 0)
    tokens = [token]
    for index in range(prompt_len, total - 1):
        token, cache = step(token[:, None], cache, index)
        tokens.append(token)
    return jnp.stack(tokens, axis=1)
