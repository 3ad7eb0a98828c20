"""inject(model.apply, cfg) equals model.apply on the merged params, for every layer type."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import ATTENTION_AXES, perturb
from dora_jax.core import AdapterConfig
from dora_jax.inject import NOT_READ


def adapted_and_merged(model, params, x, cfg, **kwargs):
    adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg), scale=0.05)
    injected = dj.inject(model.apply, cfg, **kwargs)(params, adapters, x)
    merged = model.apply({"params": dj.merge(params, adapters, cfg)}, x)
    return injected, merged


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_inject_equals_merge_on_a_dense_mlp(mlp, method):
    model, params, x = mlp
    cfg = AdapterConfig(method=method, rank=4, targets=".*/kernel")
    injected, merged = adapted_and_merged(model, params, x, cfg, fallback="error")
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_inject_equals_merge_on_attention_with_dense_general_kernels(block, method):
    model, params, x = block
    cfg = AdapterConfig(
        method=method, rank=4, targets=r".*/(query|key|value|out|up|down)/kernel", input_axes=ATTENTION_AXES
    )
    injected, merged = adapted_and_merged(model, params, x, cfg, fallback="error")
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-5)


class EinsumBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((16, 4, 6), "btd,dhk->bthk", name="heads")(x)
        h = nn.Einsum((4, 6, 16), "...hk,hkd->...d", name="merge_heads", use_bias=False)(h)
        return nn.Einsum((16, 16), einsum_str="btd,de->bte", name="square")(h)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_inject_equals_merge_on_einsum_layers(method):
    model = EinsumBlock()
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(
        method=method, rank=3, targets=".*/kernel", input_axes={"heads/kernel": (0,), "merge_heads/kernel": (0, 1)}
    )
    injected, merged = adapted_and_merged(model, params, x, cfg, fallback="error")
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-5)


def test_inject_at_init_is_the_base_model(block):
    model, params, x = block
    cfg = AdapterConfig(rank=4, targets=".*/kernel", input_axes=ATTENTION_AXES)
    adapters = dj.init_adapters(jax.random.key(2), params, cfg)
    np.testing.assert_allclose(
        dj.inject(model.apply, cfg)(params, adapters, x), model.apply({"params": params}, x), rtol=1e-5, atol=1e-6
    )


class CustomKernel(nn.Module):
    """A layer that reads its kernel itself: inject cannot intercept it and must merge it."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 8))
        return nn.Dense(4, name="head")(jnp.tanh(x @ kernel))


def test_unintercepted_target_falls_back_to_merge():
    model = CustomKernel()
    x = jax.random.normal(jax.random.key(1), (3, 10))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=2, targets=(r"kernel", r"head/kernel"))
    injected, merged = adapted_and_merged(model, params, x, cfg)
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        dj.InjectError, match=r"cannot run \(kernel: no nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed or nn.Conv"
    ):
        adapted_and_merged(model, params, x, cfg, fallback="error")


def test_merged_targets_name_each_leaf_and_why():
    model = CustomKernel()
    x = jnp.zeros((3, 10))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=2, targets=(r"kernel", r"head/kernel"))
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)
    assert dj.merged_targets(model.apply, cfg, params, adapters, x) == {"kernel": NOT_READ}
    dense = nn.Dense(6, dot_general=jax.lax.dot_general)
    params = dense.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=2, targets="kernel")
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)
    reasons = dj.merged_targets(dense.apply, cfg, params, adapters, x)
    assert reasons == {"kernel": "its nn.Dense has a custom dot_general"}


def test_dense_with_custom_dot_general_falls_back_to_merge():
    model = nn.Dense(6, dot_general=jax.lax.dot_general)
    x = jax.random.normal(jax.random.key(1), (3, 10))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=2, targets="kernel")
    injected, merged = adapted_and_merged(model, params, x, cfg)
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-6)


class TiedDense(nn.Module):
    """A Dense layer whose kernel a second method of the layer reads too (as a tied output projection)."""

    @nn.compact
    def __call__(self, x):
        dense = ReadsKernel(6, name="proj")
        return dense.untied(dense(x))


class ReadsKernel(nn.Dense):
    def untied(self, y):
        return y @ self.variables["params"]["kernel"].T


def test_a_kernel_another_method_of_its_layer_reads_is_merged_with_the_reason():
    model = TiedDense()
    x = jax.random.normal(jax.random.key(1), (3, 10))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=2, targets="proj/kernel")
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)
    reasons = dj.merged_targets(model.apply, cfg, params, adapters, x)
    assert reasons == {"proj/kernel": "its ReadsKernel.untied reads it unrouted"}
    injected, merged = adapted_and_merged(model, params, x, cfg)  # W' in both of its reads
    np.testing.assert_allclose(injected, merged, rtol=1e-5, atol=1e-6)


def test_unknown_fallback_is_rejected():
    with pytest.raises(dj.ConfigError, match=r"inject fallback: expected one of \('merge', 'error'\); got 'skip'"):
        dj.inject(nn.Dense(2).apply, AdapterConfig(targets="kernel"), fallback="skip")


def test_jitted_gradients_of_exact_dora_equal_gradients_through_merge(block):
    model, params, x = block
    cfg = AdapterConfig(rank=4, targets=".*/kernel", input_axes=ATTENTION_AXES, norm_grad="exact")
    adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg), scale=0.05)
    f = dj.inject(model.apply, cfg, fallback="error")
    injected = jax.jit(jax.grad(lambda ad: jnp.sum(f(params, ad, x) ** 2)))(adapters)
    merged = jax.jit(jax.grad(lambda ad: jnp.sum(model.apply({"params": dj.merge(params, ad, cfg)}, x) ** 2)))(adapters)
    chex.assert_trees_all_close(injected, merged, rtol=1e-4, atol=1e-5)


def test_dropout_rng_changes_the_output_and_its_absence_is_evaluation(mlp):
    model, params, x = mlp
    cfg = AdapterConfig(rank=4, targets=".*/kernel", dropout=0.3)
    adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg))
    f = dj.inject(model.apply, cfg)
    evaluation = f(params, adapters, x)
    np.testing.assert_allclose(
        evaluation, model.apply({"params": dj.merge(params, adapters, cfg)}, x), rtol=1e-5, atol=1e-5
    )
    first = f(params, adapters, x, dropout_rng=jax.random.key(7))
    again = f(params, adapters, x, dropout_rng=jax.random.key(7))
    other = f(params, adapters, x, dropout_rng=jax.random.key(8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - evaluation).max() > 1e-3 and np.abs(first - other).max() > 1e-3


def test_bf16_model_with_float32_weights_is_the_identity_at_init():
    model = nn.Dense(32, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = AdapterConfig(rank=8, targets="kernel")
    adapters = dj.init_adapters(jax.random.key(2), params, cfg)
    y = dj.inject(model.apply, cfg, fallback="error")(params, adapters, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, model.apply({"params": params}, x))
