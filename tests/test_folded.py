"""The folded forward (W0 + sAB built per layer, custom VJP) equals the factored one, values and gradients."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import ATTENTION_AXES, perturb
from dora_jax.core import AdapterConfig, factored_dense, folded_dense, init_adapter
from dora_jax.errors import ConfigError

CASES = [("lora", "detach"), ("dora", "detach"), ("dora", "exact")]


def _layer(dtype=jnp.float32, d_in=20, d_out=12):
    w0 = jax.random.normal(jax.random.key(0), (d_in, d_out), dtype)
    x = jax.random.normal(jax.random.key(2), (3, 5, d_in), dtype)  # leading axes are flattened and restored
    bias = jax.random.normal(jax.random.key(4), (d_out,), dtype)
    upstream = jax.random.normal(jax.random.key(3), (3, 5, d_out), dtype)
    return w0, x, bias, upstream


def _grads(dense, cfg, adapter, w0, x, bias, upstream):
    """Gradients of <dense(x), upstream> with respect to the adapter, x, W0 and the bias."""

    def loss(adapter, x, w0, bias):
        return jnp.sum(dense(x, w0, adapter, cfg, bias=bias) * upstream)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(adapter, x, w0, bias)


@pytest.mark.parametrize(("method", "norm_grad"), CASES)
def test_folded_values_and_gradients_equal_the_factored_path_in_float64(method, norm_grad):
    with jax.enable_x64(True):
        w0, x, bias, upstream = _layer(jnp.float64)
        cfg = AdapterConfig(method=method, rank=4, alpha=6, targets="k", norm_grad=norm_grad, dtype="float64")
        adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
        np.testing.assert_allclose(
            folded_dense(x, w0, adapter, cfg, bias=bias), factored_dense(x, w0, adapter, cfg, bias=bias), rtol=1e-12
        )
        folded = _grads(folded_dense, cfg, adapter, w0, x, bias, upstream)
        factored = _grads(factored_dense, cfg, adapter, w0, x, bias, upstream)
        chex.assert_trees_all_equal_dtypes(folded, factored)
        chex.assert_trees_all_close(folded, factored, rtol=1e-10, atol=1e-12)


def test_a_column_with_zero_magnitude_keeps_its_magnitude_gradient():
    """y = z m/n loses z where m = 0; the folded VJP keeps z, so dm there is still sum(g z) / n."""
    w0, x, bias, upstream = _layer()
    cfg = AdapterConfig(rank=4, targets="k", norm_grad="exact")
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
    adapter["m"] = adapter["m"].at[2].set(0.0)
    folded = _grads(folded_dense, cfg, adapter, w0, x, bias, upstream)[0]
    factored = _grads(factored_dense, cfg, adapter, w0, x, bias, upstream)[0]
    assert abs(float(folded["m"][2])) > 1e-3
    chex.assert_trees_all_close(folded, factored, rtol=1e-4, atol=1e-5)


def test_active_dropout_takes_the_factored_path():
    w0, x, bias, _ = _layer()
    cfg = AdapterConfig(rank=4, targets="k", dropout=0.3, forward="folded")
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
    rng = jax.random.key(5)
    np.testing.assert_array_equal(
        folded_dense(x, w0, adapter, cfg, bias=bias, dropout_rng=rng),
        factored_dense(x, w0, adapter, cfg, bias=bias, dropout_rng=rng),
    )
    # No rng (evaluation): the folded path, equal to the factored one.
    np.testing.assert_allclose(folded_dense(x, w0, adapter, cfg), factored_dense(x, w0, adapter, cfg), rtol=1e-5)


def test_bf16_compute_over_float32_weights_is_the_identity_at_init():
    w0, x, _, upstream = _layer()
    cfg = AdapterConfig(rank=4, targets="k", norm_grad="exact")
    adapter = init_adapter(jax.random.key(1), w0, cfg)
    y = folded_dense(x.astype(jnp.bfloat16), w0, adapter, cfg)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, jnp.matmul(x.astype(jnp.bfloat16), w0.astype(jnp.bfloat16)))
    grads = jax.grad(lambda ad: jnp.sum(folded_dense(x.astype(jnp.bfloat16), w0, ad, cfg) * upstream))(adapter)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(("method", "norm_grad"), CASES)
def test_inject_folded_equals_merge_on_attention_with_dense_general_kernels(block, method, norm_grad):
    model, params, x = block
    cfg = AdapterConfig(
        method=method,
        rank=4,
        targets=r".*/(query|key|value|out|up|down)/kernel",
        input_axes=ATTENTION_AXES,
        norm_grad=norm_grad,
        forward="folded",
    )
    adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg), scale=0.05)
    folded = dj.inject(model.apply, cfg, fallback="error")
    factored = dj.inject(model.apply, dataclasses.replace(cfg, forward="factored"), fallback="error")

    def merged(ad):
        return model.apply({"params": dj.merge(params, ad, cfg)}, x)

    np.testing.assert_allclose(folded(params, adapters, x), merged(adapters), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda ad: jnp.sum(folded(params, ad, x) ** 2)))(adapters)
    through_merge = jax.jit(jax.grad(lambda ad: jnp.sum(merged(ad) ** 2)))(adapters)
    through_factored = jax.jit(jax.grad(lambda ad: jnp.sum(factored(params, ad, x) ** 2)))(adapters)
    # float32 sums of terms of size ~100 (exactness is tested in float64 above): entries that
    # cancel to ~0.1 are compared to a tolerance on the scale of their leaf.
    for reference in (through_merge, through_factored):
        jax.tree.map(
            lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(r)))),
            grad,
            reference,
        )


def test_forward_names_its_choices():
    with pytest.raises(ConfigError, match=r"AdapterConfig.forward: expected one of 'factored', 'folded'; got 'fused'"):
        AdapterConfig(targets="k", forward="fused")
