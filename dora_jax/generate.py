"""Greedy decoding and beam search for the Llama family on the key/value cache, each one compiled loop.

``forward(params, ids, **kwargs)`` runs the model, e.g.
``lambda params, ids, **kw: model.apply({"params": params}, ids, **kw)`` or an ``inject``-adapted
one; ``params`` is any pytree of arrays, passed to the compiled loop as an argument (never baked
in as constants). The loop is compiled once per ``forward``, settings and input shapes and reused
by later calls: pass the same ``forward`` object to decode many batches.
Prompts are left-padded (``prompt_mask`` 0 on padding); rotary positions count real tokens only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax.models.llama import LlamaConfig, init_cache


def _positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def _decode_mask(prompt_mask: jax.Array, max_new_tokens: int) -> jax.Array:
    """The attention mask over every cache slot: the prompt's, then ones for the new tokens."""
    batch = prompt_mask.shape[0]
    return jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)


_COMPILED: collections.OrderedDict[Hashable, Callable[..., Any]] = collections.OrderedDict()
_KEPT = 16  # jitted loops kept (each holds its compiled executables, one per input shape)


def _compiled(key: Hashable, make: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """The jitted loop for ``key`` (forward and static settings): made on first use, then reused."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
    else:
        _COMPILED[key] = jax.jit(make())
        if len(_COMPILED) > _KEPT:
            _COMPILED.popitem(last=False)
    return _COMPILED[key]


def _cached_next_logits(forward: Callable[..., Any], params: Any, mask: jax.Array) -> Callable[..., Any]:
    """(ids, cache, index) -> (last position's logits, cache): one step on the cache (traceable)."""
    positions = _positions(mask)

    def step(ids, cache, index):
        logits, cache = forward(
            params,
            ids,
            attention_mask=mask,
            position_ids=jax.lax.dynamic_slice_in_dim(positions, index, ids.shape[1], axis=1),
            cache=cache,
            cache_index=index,
        )
        return logits[:, -1], cache

    return step


def greedy(
    forward: Callable[..., Any],
    params: Any,
    config: LlamaConfig,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    use_cache: bool = True,
    cache_dtype: Any = jnp.float32,
) -> jax.Array:
    """The ``max_new_tokens`` most likely next tokens, one at a time: (batch, max_new_tokens)."""
    batch, prompt_len = prompt_ids.shape
    if not use_cache:  # the reference: the whole sequence again at every step, one compile per length
        mask = _decode_mask(prompt_mask, max_new_tokens)
        positions = _positions(mask)
        full = jax.jit(lambda params, ids, mask, pos: forward(params, ids, attention_mask=mask, position_ids=pos))
        ids = prompt_ids
        for step in range(max_new_tokens):
            length = prompt_len + step
            logits = full(params, ids, mask[:, :length], positions[:, :length])
            ids = jnp.concatenate([ids, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(ids.dtype)], axis=1)
        return ids[:, prompt_len:]

    def make():
        def decode(params, prompt_ids, prompt_mask):  # prefill, then one compiled loop over the new tokens
            batch, prompt_len = prompt_ids.shape
            mask = _decode_mask(prompt_mask, max_new_tokens)
            next_logits = _cached_next_logits(forward, params, mask)

            def step(ids, cache, index):
                logits, cache = next_logits(ids, cache, index)
                return jnp.argmax(logits, axis=-1).astype(prompt_ids.dtype), cache

            cache = init_cache(config, batch, prompt_len + max_new_tokens, cache_dtype)
            token, cache = step(prompt_ids, cache, 0)
            tokens = jnp.zeros((batch, max_new_tokens), prompt_ids.dtype).at[:, 0].set(token)

            def body(i, carry):
                tokens, cache = carry
                token, cache = step(jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1), cache, prompt_len + i - 1)
                return tokens.at[:, i].set(token), cache

            return jax.lax.fori_loop(1, max_new_tokens, body, (tokens, cache))[0]

        return decode

    decode = _compiled(("greedy", forward, config, max_new_tokens, jnp.dtype(cache_dtype)), make)
    return decode(params, prompt_ids, prompt_mask)


def beam_search(
    forward: Callable[..., Any],
    params: Any,
    config: LlamaConfig,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    num_beams: int = 4,
    eos_id: int | None = None,
    cache_dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """(tokens (batch, max_new_tokens), scores (batch,)): the best of ``num_beams`` beams per prompt.

    Beams advance on the key/value cache, reordered every step. A beam that emits ``eos_id``
    is finished: it continues with ``eos_id`` at no cost. The winner maximises its summed
    log-probability divided by its length up to and including EOS (length penalty 1, as HF's
    default); without ``eos_id`` all beams have the same length and the sum decides.
    """
    k = num_beams

    def make():
        def decode(params, prompt_ids, prompt_mask):  # prefill, then one compiled loop: select, advance
            batch, prompt_len = prompt_ids.shape
            mask = jnp.repeat(_decode_mask(prompt_mask, max_new_tokens), k, axis=0)
            next_logits = _cached_next_logits(forward, params, mask)

            def logprobs(ids, cache, index):
                logits, cache = next_logits(ids, cache, index)
                return jax.nn.log_softmax(logits.astype(jnp.float32)), cache

            def select(scores, finished, lengths, tokens, logp, cache, step):
                vocab = logp.shape[-1]
                logp = logp.reshape(batch, k, vocab)
                if eos_id is not None:  # a finished beam continues with EOS at no cost
                    stay = jnp.full((vocab,), -jnp.inf).at[eos_id].set(0.0)
                    logp = jnp.where(finished[..., None], stay, logp)
                total_scores = (scores[..., None] + logp).reshape(batch, k * vocab)
                scores, flat = jax.lax.top_k(total_scores, k)
                beam, token = flat // vocab, (flat % vocab).astype(tokens.dtype)
                rows = (jnp.arange(batch)[:, None] * k + beam).reshape(-1)
                tokens = tokens.reshape(batch * k, -1)[rows].at[:, step].set(token.reshape(-1))
                was_finished = jnp.take_along_axis(finished, beam, axis=1)
                lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~was_finished).astype(lengths.dtype)
                finished = was_finished | ((token == eos_id) if eos_id is not None else False)
                cache = jax.tree.map(lambda c: c[rows], cache)
                return scores, finished, lengths, tokens.reshape(batch, k, -1), cache

            # Only the first beam of each prompt is live at the start, so the k beams begin distinct.
            scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1)), (batch, 1))
            finished = jnp.zeros((batch, k), bool)
            lengths = jnp.zeros((batch, k), jnp.int32)
            tokens = jnp.zeros((batch, k, max_new_tokens), prompt_ids.dtype)
            cache = init_cache(config, batch * k, prompt_len + max_new_tokens, cache_dtype)
            logp, cache = logprobs(jnp.repeat(prompt_ids, k, axis=0), cache, 0)

            def body(step, carry):
                scores, finished, lengths, tokens, logp, cache = carry
                scores, finished, lengths, tokens, cache = select(scores, finished, lengths, tokens, logp, cache, step)
                token = jax.lax.dynamic_index_in_dim(tokens, step, axis=2, keepdims=False)
                logp, cache = logprobs(token.reshape(-1, 1), cache, prompt_len + step)
                return scores, finished, lengths, tokens, logp, cache

            carry = (scores, finished, lengths, tokens, logp, cache)
            scores, finished, lengths, tokens, logp, cache = jax.lax.fori_loop(0, max_new_tokens - 1, body, carry)
            return select(scores, finished, lengths, tokens, logp, cache, max_new_tokens - 1)[:4]

        return decode

    key = ("beam", forward, config, max_new_tokens, k, eos_id, jnp.dtype(cache_dtype))
    scores, finished, lengths, tokens = _compiled(key, make)(params, prompt_ids, prompt_mask)
    normalised = scores / jnp.maximum(lengths, 1) if eos_id is not None else scores
    best = jnp.argmax(normalised, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]  # noqa: E731
    return jax.vmap(lambda t, b: t[b])(tokens, best), pick(scores)
