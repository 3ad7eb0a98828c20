"""Greedy decoding with the key/value cache gives the tokens of decoding without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import TINY_LLAMA
from dora_jax import generate, models


@pytest.fixture(scope="module")
def tiny():
    model = models.from_hf_config(dict(TINY_LLAMA, model_type="llama"))
    params = models.init_params(model, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)  # sharper logits: varied tokens
    ids = jnp.asarray(np.random.default_rng(0).integers(3, TINY_LLAMA["vocab_size"], size=(3, 7)))
    mask = jnp.ones_like(ids).at[1, :3].set(0).at[2, :1].set(0)  # left padding of different lengths
    return model, params, ids, mask


def plain(model):
    """forward(params, ids, **kw) of the model alone, one object per model so that loops are reused."""
    if model not in FORWARDS:
        FORWARDS[model] = lambda params, ids, **kw: model.apply({"params": params}, ids, **kw)
    return FORWARDS[model]


FORWARDS = {}


def test_cached_greedy_decoding_equals_recomputing_the_whole_sequence(tiny):
    model, params, ids, mask = tiny
    cached = generate.greedy(plain(model), params, model.config, ids, mask, max_new_tokens=8)
    recomputed = generate.greedy(plain(model), params, model.config, ids, mask, max_new_tokens=8, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)
    assert cached.shape == (3, 8) and len(np.unique(np.asarray(cached))) > 2


def test_cached_decoding_works_through_inject_with_adapters(tiny):
    model, params, ids, mask = tiny
    cfg = dj.AdapterConfig(rank=4, targets=r".*/(q_proj|v_proj|up_proj)/kernel")
    adapters = jax.tree.map(lambda a: a + 0.2, dj.init_adapters(jax.random.key(1), params, cfg))
    adapted = dj.inject(model.apply, cfg, fallback="error")
    forward = lambda both, x, **kw: adapted(*both, x, **kw)  # noqa: E731
    merged = dj.merge(params, adapters, cfg)
    np.testing.assert_array_equal(
        generate.greedy(forward, (params, adapters), model.config, ids, mask, 6),
        generate.greedy(plain(model), merged, model.config, ids, mask, 6, use_cache=False),
    )


def test_prefill_logits_with_a_cache_equal_the_plain_forward(tiny):
    model, params, ids, mask = tiny
    plain = model.apply(
        {"params": params}, ids, attention_mask=mask, position_ids=jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    )
    full_mask = jnp.concatenate([mask, jnp.ones((3, 5), mask.dtype)], axis=1)
    cached, _ = model.apply(
        {"params": params},
        ids,
        attention_mask=full_mask,
        position_ids=jnp.maximum(jnp.cumsum(mask, -1) - 1, 0),
        cache=models.llama.init_cache(model.config, 3, 12),
        cache_index=0,
    )
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[keep], np.asarray(plain)[keep], rtol=1e-5, atol=1e-5)


def sequence_score(model, params, ids, mask, new):
    """Summed log-probability of ``new`` after each left-padded prompt, from one full forward pass."""
    full = jnp.concatenate([ids, new], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(new)], axis=1)
    logits = model.apply(
        {"params": params}, full, attention_mask=full_mask, position_ids=jnp.maximum(jnp.cumsum(full_mask, -1) - 1, 0)
    )
    logp = jax.nn.log_softmax(logits[:, ids.shape[1] - 1 : -1].astype(jnp.float32))
    return jnp.take_along_axis(logp, new[..., None], axis=-1)[..., 0].sum(-1)


def test_one_beam_is_greedy(tiny):
    model, params, ids, mask = tiny
    forward = plain(model)
    tokens, scores = generate.beam_search(forward, params, model.config, ids, mask, 5, num_beams=1)
    np.testing.assert_array_equal(tokens, generate.greedy(forward, params, model.config, ids, mask, 5))
    np.testing.assert_allclose(scores, sequence_score(model, params, ids, mask, tokens), rtol=1e-4, atol=1e-4)


def test_beam_scores_are_the_sequences_log_probabilities_and_beat_greedy_here(tiny):
    model, params, ids, mask = tiny
    forward = plain(model)
    tokens, scores = generate.beam_search(forward, params, model.config, ids, mask, 5, num_beams=4)
    np.testing.assert_allclose(scores, sequence_score(model, params, ids, mask, tokens), rtol=1e-4, atol=1e-4)
    greedy = sequence_score(model, params, ids, mask, generate.greedy(forward, params, model.config, ids, mask, 5))
    assert np.all(np.asarray(scores) >= np.asarray(greedy) - 1e-4)


def test_full_width_beam_search_over_two_tokens_is_exhaustive(tiny):
    model, params, ids, mask = tiny
    vocab = TINY_LLAMA["vocab_size"]
    forward = plain(model)
    _, scores = generate.beam_search(forward, params, model.config, ids[:1], mask[:1], 2, num_beams=vocab)
    pairs = jnp.stack(jnp.meshgrid(jnp.arange(vocab), jnp.arange(vocab), indexing="ij"), -1).reshape(-1, 2)
    every = sequence_score(
        model, params, jnp.repeat(ids[:1], len(pairs), 0), jnp.repeat(mask[:1], len(pairs), 0), pairs
    )
    np.testing.assert_allclose(scores[0], every.max(), rtol=1e-4, atol=1e-4)


def test_finished_beams_continue_with_eos_at_no_cost(tiny):
    model, params, ids, mask = tiny
    forward = plain(model)
    first = int(generate.greedy(forward, params, model.config, ids[:1], mask[:1], 1)[0, 0])
    tokens, _ = generate.beam_search(forward, params, model.config, ids[:1], mask[:1], 6, num_beams=1, eos_id=first)
    np.testing.assert_array_equal(tokens[0], np.full(6, first))  # EOS first, then EOS padding


def test_repeated_decoding_compiles_each_loop_once(tiny):
    model, params, ids, mask = tiny
    traces = []

    def counted(params, x, **kw):
        traces.append(x.shape)  # runs only while a loop is traced for compilation
        return model.apply({"params": params}, x, **kw)

    moved = jax.tree.map(lambda p: p * 1.01, params)  # new parameter values, same shapes: no retrace
    for p in (params, params, moved):
        generate.greedy(counted, p, model.config, ids, mask, 4)
        generate.beam_search(counted, p, model.config, ids, mask, 4, num_beams=2)
    # One trace per loop: the prefill and the decoding step of greedy, the same two of beam search.
    assert traces == [(3, 7), (3, 1), (6, 7), (6, 1)]
