"""models.layers.dot_product_attention: softmax attention with a recomputing backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.errors import ConfigError
from dora_jax.models.layers import (
    attention_bias,
    attention_mask,
    dot_product_attention,
    even_lengths,
    resolve_attention,
)
from scripts.attention_cost import main as attention_cost
from scripts.attention_cost import residuals
from scripts.attention_cost import textbook_attention as reference_attention

BATCH, QUERY, HEAD_DIM = 2, 9, 8


def operands(heads, kv_heads, dtype, key_len=QUERY):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (BATCH, QUERY, heads, HEAD_DIM), dtype)
    k = jax.random.normal(keys[1], (BATCH, key_len, kv_heads, HEAD_DIM), dtype)
    v = jax.random.normal(keys[2], (BATCH, key_len, kv_heads, HEAD_DIM), dtype)
    return q, k, v


def value_and_grads(attention, q, k, v, allowed):
    def loss(q, k, v):
        out = attention(q, k, v, allowed)
        return jnp.sum(jnp.sin(out.astype(jnp.promote_types(out.dtype, jnp.float32))))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_matches_reference(q, k, v, allowed, rtol=0, atol=1e-12):
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, allowed), reference_attention(q, k, v, allowed), rtol=rtol, atol=atol
    )
    (value, grads), (ref_value, ref_grads) = (
        value_and_grads(dot_product_attention, q, k, v, allowed),
        value_and_grads(reference_attention, q, k, v, allowed),
    )
    np.testing.assert_allclose(value, ref_value, rtol=max(rtol, 1e-12))
    for got, want in zip(grads, ref_grads, strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


MASKS = {
    "bidirectional_padding": dict(causal=False, padding=True),
    "causal": dict(causal=True, padding=False),
    "causal_padding": dict(causal=True, padding=True),
    "sliding_window": dict(causal=True, padding=False, sliding_window=3),
}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
def test_values_and_gradients_equal_autodiff_of_textbook_attention(heads, kv_heads, mask):
    with jax.enable_x64():
        q, k, v = operands(heads, kv_heads, jnp.float64)
        spec = dict(MASKS[mask])
        padding = jnp.ones((BATCH, QUERY)).at[1, 6:].set(0) if spec.pop("padding") else None
        allowed = attention_bias(QUERY, QUERY, padding, **spec)
        assert_matches_reference(q, k, v, allowed)


def test_decoding_queries_against_a_longer_key_cache_match_the_reference():
    with jax.enable_x64():
        q, k, v = operands(4, 2, jnp.float64, key_len=QUERY + 5)
        allowed = attention_bias(QUERY, QUERY + 5, None, causal=True, query_offset=5)
        assert_matches_reference(q, k, v, allowed)


def test_a_query_with_no_allowed_key_averages_the_values_with_finite_gradients():
    # As softmax over equal (minimum) scores: the same rule as the textbook reference.
    q, k, v = operands(4, 4, jnp.float32)
    allowed = jnp.ones((BATCH, 1, QUERY, QUERY), bool).at[0, 0, 3].set(False)
    out = dot_product_attention(q, k, v, allowed)
    np.testing.assert_allclose(out[0, 3], jnp.mean(v[0], axis=0), rtol=1e-5, atol=1e-6)
    assert_matches_reference(q, k, v, allowed, rtol=1e-4, atol=1e-5)


def test_backward_keeps_no_query_by_key_array():
    # The probabilities are rebuilt from the per-query maximum and denominator, and the mask is
    # broadcast over the query groups, not copied: nothing of size query x key lives from the
    # forward to the backward but the caller's mask (the textbook version keeps the probabilities).
    q, k, v = operands(4, 2, jnp.float32)
    allowed = jnp.ones((BATCH, 1, QUERY, QUERY), bool)  # the caller's mask: an input, not a residual

    def residual_shapes(attention):
        return [r.shape for r in residuals(attention, q, k, v, allowed)]

    def query_by_key(shape):  # (..., query, key) or, per group of query heads, (..., groups * query, key)
        return len(shape) >= 2 and shape[-1] == QUERY and shape[-2] % QUERY == 0

    assert not any(query_by_key(s) for s in residual_shapes(dot_product_attention))
    assert any(query_by_key(s) for s in residual_shapes(reference_attention))


def test_bfloat16_keeps_its_dtype_and_is_as_accurate_as_the_textbook_version():
    q, k, v = operands(4, 2, jnp.float32)
    allowed = attention_bias(QUERY, QUERY, None, causal=True)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert dot_product_attention(*low, allowed).dtype == jnp.bfloat16
    with jax.enable_x64():
        _, truth = value_and_grads(reference_attention, *(x.astype(jnp.float64) for x in (q, k, v)), allowed)
        _, ours = value_and_grads(dot_product_attention, *low, allowed)
        _, textbook = value_and_grads(reference_attention, *low, allowed)
        for got, textbook_grad, want in zip(ours, textbook, truth, strict=True):
            assert got.dtype == jnp.bfloat16
            assert relative_error(got, want) < 1.5 * relative_error(textbook_grad, want) + 1e-3


def relative_error(x, truth):
    return float(jnp.linalg.norm(x.astype(truth.dtype) - truth) / jnp.linalg.norm(truth))


def test_attention_cost_script_measures_saved_activations_linear_in_seq_for_ours_only():
    def run(seq):
        argv = ["--batch", "2", "--seq", str(seq), "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--steps", "1"]
        return attention_cost(argv)

    short, long = run(16), run(32)
    assert set(short) == {"ours", "textbook", "jax_xla"}
    assert all(r["ms"] > 0 and r["gflop"] > 0 and r["temp_mib"] > 0 for r in short.values())
    # Twice the sequence: ours keeps twice the bytes (q, k, v, out, per-query maximum and sum);
    # the textbook version's probabilities make it grow toward four times.
    scalars = 64 / 2**20  # a few bytes of scalar constants that do not grow
    assert long["ours"]["residual_mib"] == pytest.approx(2 * short["ours"]["residual_mib"], abs=scalars)
    assert long["textbook"]["residual_mib"] > 2.5 * short["textbook"]["residual_mib"]
    assert long["jax_xla"]["residual_mib"] > 2.5 * short["jax_xla"]["residual_mib"]  # autodiff: probabilities kept


@pytest.mark.parametrize("mask", ["causal_padding", "sliding_window"])
def test_xla_implementation_equals_the_recomputing_kernel(mask):
    # jax.nn.dot_product_attention (model.attention="xla"; "cudnn" shares its call) with the Llama family's
    # masks (causal with padding; Mistral's window), GQA.
    q, k, v = operands(4, 2, jnp.float32)
    spec = dict(MASKS[mask])
    padding = jnp.ones((BATCH, QUERY)).at[1, 6:].set(0) if spec.pop("padding") else None
    allowed = attention_bias(QUERY, QUERY, padding, **spec)
    ours = value_and_grads(dot_product_attention, q, k, v, allowed)
    xla = value_and_grads(lambda *a: dot_product_attention(*a, implementation="xla"), q, k, v, allowed)
    np.testing.assert_allclose(xla[0], ours[0], rtol=1e-5)
    for got, want in zip(xla[1], ours[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_xla_implementation_averages_a_query_with_no_allowed_key_as_ours_does():
    q, k, v = operands(4, 2, jnp.float32, key_len=QUERY + 5)
    allowed = attention_bias(QUERY, QUERY + 5, None, causal=True, query_offset=5).at[:, :, 3].set(False)
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, allowed, "xla"), dot_product_attention(q, k, v, allowed), atol=1e-5
    )


@pytest.mark.parametrize("key_len", [QUERY, QUERY + 5], ids=["odd_odd", "odd_even"])
def test_padding_odd_lengths_for_cudnn_keeps_the_values_and_gradients(key_len):
    # cuDNN's masked training kernels take even lengths: its path pads one position (even_lengths), the
    # padded query's output dropped; here through XLA's implementation, which takes the same arguments
    q, k, v = operands(4, 2, jnp.float32, key_len=key_len)
    padding = jnp.ones((BATCH, key_len)).at[1, 6:].set(0)
    allowed = attention_bias(QUERY, key_len, padding, causal=True, query_offset=key_len - QUERY)

    def padded(q, k, v, allowed):
        *operands, mask = even_lengths(q, k, v, allowed)
        return jax.nn.dot_product_attention(*operands, mask=mask)[:, :QUERY]

    assert all(x.shape[1] % 2 == 0 for x in even_lengths(q, k, v, allowed)[:3])
    xla = value_and_grads(lambda *a: dot_product_attention(*a, implementation="xla"), q, k, v, allowed)
    ours = value_and_grads(padded, q, k, v, allowed)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-6)
    for got, want in zip(ours[1], xla[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "backend,dtype,head_dim,expected",
    [
        ("cpu", jnp.bfloat16, 64, "recompute"),
        ("gpu", jnp.bfloat16, 128, "cudnn"),
        ("gpu", jnp.float16, 64, "cudnn"),
        ("gpu", jnp.float32, 64, "xla"),  # cuDNN's fused kernel: 16-bit inputs only
        ("gpu", jnp.bfloat16, 256, "xla"),
        ("tpu", jnp.bfloat16, 128, "splash"),
        ("tpu", jnp.float32, 256, "splash"),
        ("tpu", jnp.bfloat16, 64, "xla"),  # splash: head dims that fill its 128 lanes
    ],
)
def test_auto_picks_the_implementation_per_backend(backend, dtype, head_dim, expected):
    assert resolve_attention("auto", dtype, head_dim, backend) == expected
    assert resolve_attention("xla", dtype, head_dim, backend) == "xla"  # a named one is kept


def test_splash_attention_on_a_gpu_names_the_gpus_choices():
    with pytest.raises(
        ConfigError, match=r"'splash' is Pallas' TPU kernel .* on a GPU choose 'cudnn', 'xla' or 'auto'"
    ):
        resolve_attention("splash", jnp.bfloat16, 128, "gpu")
    assert resolve_attention("splash", jnp.float32, 16, "cpu") == "splash"  # Pallas' interpreter (the tests)


def test_an_unknown_attention_lists_the_choices():
    with pytest.raises(
        ConfigError, match=r"attention: expected one of \['auto', 'recompute', 'xla', 'cudnn', 'splash'\]"
    ):
        resolve_attention("flash", jnp.float32, 8)


def test_a_llama_with_xla_attention_gives_the_default_logits_also_when_decoding():
    from conftest import TINY_LLAMA, token_batch
    from dora_jax import models
    from dora_jax.models.llama import init_cache

    hf = dict(TINY_LLAMA, model_type="mistral", sliding_window=5)
    ours, xla = (models.from_hf_config(hf, attention=name) for name in ("recompute", "xla"))
    params = models.init_params(ours, jax.random.key(0))
    ids, mask = (jnp.asarray(a) for a in token_batch(TINY_LLAMA["vocab_size"]))
    want = jax.jit(ours.apply)({"params": params}, ids, attention_mask=mask)
    np.testing.assert_allclose(jax.jit(xla.apply)({"params": params}, ids, attention_mask=mask), want, atol=1e-5)
    cache = init_cache(xla.config, 2, ids.shape[1] + 1)
    step = jax.jit(lambda model, *a, **kw: model.apply({"params": params}, *a, **kw)[0], static_argnums=0)
    full_mask = jnp.concatenate([mask, jnp.ones((2, 1), mask.dtype)], axis=1)
    got = [step(m, ids, attention_mask=full_mask, cache=cache, cache_index=0) for m in (ours, xla)]
    np.testing.assert_allclose(got[1], got[0], atol=1e-5)


@pytest.mark.parametrize(
    "mask,heads,kv_heads",
    [("bidirectional_padding", 4, 4), ("sliding_window", 4, 1)],  # GQA with padding: the Llama test below
    ids=["mha", "mqa"],
)
def test_splash_attention_equals_the_recomputing_kernel_on_real_queries(mask, heads, kv_heads):
    # Pallas' TPU kernel, in its interpreter on CPU; the sequence padded to its block of 128. A padding query
    # attends padding keys there (segment ids), real keys here: its row is compared by neither loss.
    q, k, v = operands(heads, kv_heads, jnp.float32)
    spec = dict(MASKS[mask])
    padding = jnp.ones((BATCH, QUERY), jnp.int32).at[1, 6:].set(0) if spec.pop("padding") else None
    structured = attention_mask(QUERY, QUERY, padding, **spec)
    real = (jnp.ones((BATCH, QUERY)) if padding is None else padding)[:, :, None, None]

    def on_real_queries(implementation):
        return lambda q, k, v, mask: real * dot_product_attention(q, k, v, mask, implementation)

    splash = value_and_grads(on_real_queries("splash"), q, k, v, structured)
    ours = value_and_grads(on_real_queries("recompute"), q, k, v, structured.allowed)
    np.testing.assert_allclose(splash[0], ours[0], rtol=1e-5)
    for got, want in zip(splash[1], ours[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_splash_attention_without_the_masks_structure_or_with_a_cache_offset_runs_xlas():
    q, k, v = operands(4, 2, jnp.float32, key_len=QUERY + 5)
    decoding = attention_mask(QUERY, QUERY + 5, None, causal=True, query_offset=5)
    assert not decoding.aligned
    want = dot_product_attention(q, k, v, decoding.allowed, "xla")
    np.testing.assert_array_equal(dot_product_attention(q, k, v, decoding, "splash"), want)
    np.testing.assert_array_equal(dot_product_attention(q, k, v, decoding.allowed, "splash"), want)


def test_a_llama_with_splash_attention_gives_the_default_logits():
    from conftest import TINY_LLAMA, token_batch
    from dora_jax import models

    hf = dict(TINY_LLAMA, model_type="mistral", sliding_window=5)
    ours, splash = (models.from_hf_config(hf, attention=name) for name in ("recompute", "splash"))
    params = models.init_params(ours, jax.random.key(0))
    ids, mask = (jnp.asarray(a) for a in token_batch(TINY_LLAMA["vocab_size"]))
    real = mask[..., None].astype(bool)  # right padding: a padding query's logits are not compared
    got, want = (
        jnp.where(real, jax.jit(m.apply)({"params": params}, ids, attention_mask=mask), 0) for m in (splash, ours)
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
