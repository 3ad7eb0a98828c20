"""Closed-form checks of the DoRA/LoRA math: decomposition, init, merge, norms and gradients."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import dora_jax as dj
from conftest import perturb
from dora_jax.core import (
    AdapterConfig,
    factored_column_norm,
    factored_dense,
    folded_dense,
    init_adapter,
    kernel_layout,
    merge_kernel,
)
from dora_jax.core.dora import NORM_EPS, low_rank_dropout


def numpy_merge(w0, a, b, m, scale, method):
    """W' in float64 numpy, straight from the formula in docs/concepts.md."""
    w = np.asarray(w0, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    if method == "lora":
        return w
    return np.asarray(m, np.float64) * w / np.sqrt((w * w).sum(axis=0) + NORM_EPS)


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_decompose_round_trips_and_gives_unit_columns(d_in, d_out, seed):
    kernel = np.random.default_rng(seed).normal(size=(d_in, d_out)).astype(np.float32)
    magnitude, direction = jax.jit(dj.decompose)(kernel)  # one compile per shape, not one per operation
    chex.assert_shape(magnitude, (d_out,))
    np.testing.assert_allclose(magnitude * direction, kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(direction, axis=0), 1.0, rtol=1e-6)


def test_decompose_of_a_three_axis_kernel_takes_norms_over_the_input_axes():
    kernel = jax.random.normal(jax.random.key(0), (4, 3, 5))  # (heads, head_dim, d_model)
    magnitude, direction = dj.decompose(kernel, input_axes=(0, 1))
    np.testing.assert_allclose(magnitude, np.linalg.norm(np.asarray(kernel).reshape(12, 5), axis=0), rtol=1e-6)
    np.testing.assert_allclose(magnitude * direction, kernel, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_merge_at_init_is_the_identity_for_every_target(block, method):
    _, params, _ = block
    cfg = AdapterConfig(
        method=method,
        rank=4,
        targets=".*/kernel",
        input_axes={r".*/(query|key|value)/kernel": (0,), r".*/out/kernel": (0, 1)},
    )
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    assert len(dj.core.adapter_entries(adapters)) == 6
    chex.assert_trees_all_close(dj.merge(params, adapters, cfg), params, rtol=1e-6, atol=1e-7)


def test_init_shapes_and_values_follow_peft():
    kernel = jax.random.normal(jax.random.key(0), (64, 24))
    adapter = init_adapter(jax.random.key(1), kernel, AdapterConfig(rank=8, targets="k"))
    chex.assert_shape([adapter["a"], adapter["b"], adapter["m"]], [(64, 8), (8, 24), (24,)])
    assert float(jnp.abs(adapter["a"]).max()) <= 1 / 8  # U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert float(jnp.abs(adapter["a"]).max()) > 0.9 / 8
    np.testing.assert_array_equal(adapter["b"], 0.0)
    np.testing.assert_allclose(adapter["m"], np.linalg.norm(kernel, axis=0), rtol=1e-6)


def test_adapter_dtype_is_independent_of_the_kernel():
    kernel = jax.random.normal(jax.random.key(0), (16, 8), jnp.bfloat16)
    adapter = init_adapter(jax.random.key(1), kernel, AdapterConfig(rank=2, targets="k", dtype="float32"))
    assert {leaf.dtype for leaf in adapter.values()} == {jnp.dtype("float32")}


@pytest.mark.parametrize("method", ["dora", "lora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_the_float64_formula(method, rslora):
    w0 = jax.random.normal(jax.random.key(0), (40, 24))
    cfg = AdapterConfig(method=method, rank=6, alpha=12, targets="k", rslora=rslora)
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
    merged = merge_kernel(w0, adapter, cfg)
    expected = numpy_merge(w0, adapter["a"], adapter["b"], adapter.get("m"), cfg.scale, method)
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_merge_of_a_three_axis_kernel_equals_the_matrix_formula():
    w0 = jax.random.normal(jax.random.key(0), (4, 3, 10))  # (heads, head_dim, d_model), inputs (0, 1)
    cfg = AdapterConfig(rank=3, targets="k", input_axes={"k": (0, 1)})
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg, "k"))
    chex.assert_shape([adapter["a"], adapter["b"], adapter["m"]], [(4, 3, 3), (3, 10), (10,)])
    expected = numpy_merge(
        np.reshape(w0, (12, 10)), np.reshape(adapter["a"], (12, 3)), adapter["b"], adapter["m"], cfg.scale, "dora"
    )
    np.testing.assert_allclose(merge_kernel(w0, adapter, cfg, (0, 1)), expected.reshape(4, 3, 10), rtol=1e-5, atol=1e-6)


def test_merge_with_non_leading_input_axes_transposes_back():
    w0 = jax.random.normal(jax.random.key(0), (10, 4, 3))  # input axes (1, 2) in the middle and end
    cfg = AdapterConfig(rank=3, targets="k", input_axes={"k": (1, 2)})
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg, "k"))
    as_leading = jnp.transpose(w0, (1, 2, 0))
    expected = merge_kernel(as_leading, adapter, cfg, (0, 1))
    np.testing.assert_allclose(merge_kernel(w0, adapter, cfg, (1, 2)), jnp.transpose(expected, (2, 0, 1)), rtol=1e-6)


def test_lora_is_dora_without_the_magnitude():
    w0 = jax.random.normal(jax.random.key(0), (20, 12))
    dora_cfg = AdapterConfig(method="dora", rank=4, targets="k")
    lora_cfg = AdapterConfig(method="lora", rank=4, targets="k")
    dora = perturb(init_adapter(jax.random.key(1), w0, dora_cfg))
    lora = init_adapter(jax.random.key(1), w0, lora_cfg)
    assert set(lora) == {"a", "b"}
    np.testing.assert_array_equal(lora["a"], init_adapter(jax.random.key(1), w0, dora_cfg)["a"])
    lora = {"a": dora["a"], "b": dora["b"]}
    lora_merged = merge_kernel(w0, lora, lora_cfg)
    # DoRA whose magnitude equals the adapted kernel's own column norm is LoRA.
    dora["m"] = jnp.sqrt(jnp.sum(lora_merged**2, axis=0) + NORM_EPS)
    np.testing.assert_allclose(merge_kernel(w0, dora, dora_cfg), lora_merged, rtol=1e-6, atol=1e-6)
    x = jax.random.normal(jax.random.key(2), (5, 20))
    np.testing.assert_allclose(factored_dense(x, w0, lora, lora_cfg), x @ lora_merged, rtol=1e-5, atol=1e-5)


def test_factored_column_norm_equals_the_direct_norm():
    with jax.enable_x64(True):
        w0 = jax.random.normal(jax.random.key(0), (50, 30), jnp.float64)
        a = jax.random.normal(jax.random.key(1), (50, 7), jnp.float64)
        b = jax.random.normal(jax.random.key(2), (7, 30), jnp.float64)
        direct = np.sqrt((np.asarray(w0 + 0.7 * a @ b) ** 2).sum(axis=0) + NORM_EPS)
        np.testing.assert_allclose(factored_column_norm(w0, a, b, 0.7), direct, rtol=1e-12)


def test_factored_column_norm_runs_in_float32_for_bf16_inputs():
    w0 = jax.random.normal(jax.random.key(0), (64, 16), jnp.bfloat16)
    adapter = {"a": jnp.ones((64, 2), jnp.bfloat16), "b": jnp.ones((2, 16), jnp.bfloat16)}
    assert factored_column_norm(w0, adapter["a"], adapter["b"], 1.0).dtype == jnp.float32


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_factored_dense_equals_the_merged_matmul(method):
    w0 = jax.random.normal(jax.random.key(0), (24, 16))
    bias = jax.random.normal(jax.random.key(4), (16,))
    cfg = AdapterConfig(method=method, rank=4, targets="k")
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
    x = jax.random.normal(jax.random.key(2), (3, 7, 24))
    expected = x @ merge_kernel(w0, adapter, cfg) + bias
    np.testing.assert_allclose(factored_dense(x, w0, adapter, cfg, bias=bias), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dense", [factored_dense, folded_dense])
def test_zero_column_gives_finite_outputs_and_gradients(dense):
    w0 = jnp.zeros((8, 4)).at[:, 1:].set(jax.random.normal(jax.random.key(0), (8, 3)))
    cfg = AdapterConfig(rank=2, targets="k", norm_grad="exact")
    adapter = init_adapter(jax.random.key(1), w0, cfg)
    x = jax.random.normal(jax.random.key(2), (5, 8))
    magnitude, direction = dj.decompose(w0)
    assert np.isfinite(direction).all() and magnitude[0] < 1e-5
    y = dense(x, w0, adapter, cfg)
    np.testing.assert_allclose(y, x @ w0, rtol=1e-5, atol=1e-6)  # still the identity at init
    grads = jax.grad(lambda ad: jnp.sum(dense(x, w0, ad, cfg) ** 2))(adapter)
    merged_grads = jax.grad(lambda ad: jnp.sum(merge_kernel(w0, ad, cfg) ** 2))(adapter)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves((grads, merged_grads)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_forward_is_finite_and_close_to_float32(dtype):
    w0 = jax.random.normal(jax.random.key(0), (64, 32)) * 0.05
    cfg = AdapterConfig(rank=8, targets="k")
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg), scale=0.05)
    x = jax.random.normal(jax.random.key(2), (16, 64))
    y_half = factored_dense(x.astype(dtype), w0.astype(dtype), adapter, cfg)
    assert y_half.dtype == dtype and np.isfinite(np.asarray(y_half, np.float32)).all()
    np.testing.assert_allclose(
        np.asarray(y_half, np.float32), factored_dense(x, w0, adapter, cfg), rtol=0.05, atol=0.05
    )


def _loss_inputs():
    w0 = jax.random.normal(jax.random.key(0), (20, 12), jnp.float64)
    x = jax.random.normal(jax.random.key(2), (9, 20), jnp.float64)
    target = jax.random.normal(jax.random.key(3), (9, 12), jnp.float64)
    return w0, x, target


def test_exact_gradients_equal_autodiff_through_merge_in_float64():
    with jax.enable_x64(True):
        w0, x, target = _loss_inputs()
        cfg = AdapterConfig(rank=4, targets="k", norm_grad="exact", dtype="float64")
        adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
        factored = jax.grad(lambda ad: jnp.sum((factored_dense(x, w0, ad, cfg) - target) ** 2))(adapter)
        merged = jax.grad(lambda ad: jnp.sum((x @ merge_kernel(w0, ad, cfg) - target) ** 2))(adapter)
        for key in "abm":
            assert factored[key].dtype == jnp.float64
            np.testing.assert_allclose(factored[key], merged[key], rtol=1e-8, atol=1e-10)


def textbook_dense(x, w0, adapter, cfg, *, bias, dropout_rng):
    """The factored forward as plain autodiff sees it: (m / n) (x W0 + s drop(x) A B) + bias."""
    branch = low_rank_dropout(x, cfg.dropout, dropout_rng)
    z = x @ w0 + cfg.scale * (branch @ adapter["a"]) @ adapter["b"]
    if cfg.method == "lora":
        return z + bias
    w = w0 + cfg.scale * adapter["a"] @ adapter["b"]
    norm = jnp.sqrt(jnp.sum(w * w, axis=0) + NORM_EPS)
    if cfg.norm_grad == "detach":
        norm = jax.lax.stop_gradient(norm)
    return adapter["m"] / norm * z + bias


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method, norm_grad", [("lora", "detach"), ("dora", "detach"), ("dora", "exact")])
def test_factored_gradients_of_every_input_equal_textbook_autodiff_in_float64(method, norm_grad, dropout):
    # factored_dense has its own VJP (scales applied to W0 and B, not to g): x, W0, bias, A, B, m.
    with jax.enable_x64(True):
        w0, x, upstream = _loss_inputs()
        bias = jax.random.normal(jax.random.key(4), (12,), jnp.float64)
        cfg = AdapterConfig(
            method=method, rank=4, alpha=6, targets="k", norm_grad=norm_grad, dropout=dropout, dtype="float64"
        )
        adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
        rng = jax.random.key(5)

        def loss(dense):
            return lambda x, w0, bias, ad: jnp.sum(dense(x, w0, ad, cfg, bias=bias, dropout_rng=rng) * upstream)

        ours = jax.grad(loss(factored_dense), argnums=(0, 1, 2, 3))(x, w0, bias, adapter)
        expected = jax.grad(loss(textbook_dense), argnums=(0, 1, 2, 3))(x, w0, bias, adapter)
        chex.assert_trees_all_close(ours, expected, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_equal_dtypes(ours, expected)


@pytest.mark.parametrize("dense", [factored_dense, folded_dense])
def test_bfloat16_gradients_keep_their_dtypes_and_follow_float32(dense):
    w0 = jax.random.normal(jax.random.key(0), (64, 32)) * 0.05
    cfg = AdapterConfig(rank=8, targets="k", norm_grad="exact")
    adapter = perturb(init_adapter(jax.random.key(1), w0, cfg), scale=0.05)
    x = jax.random.normal(jax.random.key(2), (16, 64))
    upstream = jax.random.normal(jax.random.key(3), (16, 32))

    def grads(x, w0):
        loss = lambda x, w0, ad: jnp.sum(dense(x, w0, ad, cfg).astype(jnp.float32) * upstream)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(x, w0, adapter)

    half = grads(x.astype(jnp.bfloat16), w0.astype(jnp.bfloat16))
    full = grads(x, w0)
    assert half[0].dtype == half[1].dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(half[2]))  # adapters stay float32
    for ours, reference in zip(jax.tree.leaves(half), jax.tree.leaves(full), strict=True):
        scale = np.abs(np.asarray(reference)).max()
        np.testing.assert_allclose(np.asarray(ours, np.float32), reference, atol=0.03 * scale)


def test_detached_gradients_equal_the_analytic_formula():
    """With the norm n treated as a constant: y = (m/n) * z, z = x W0 + s (x A) B."""
    with jax.enable_x64(True):
        w0, x, upstream = _loss_inputs()
        cfg = AdapterConfig(rank=4, alpha=6, targets="k", norm_grad="detach", dtype="float64")
        adapter = perturb(init_adapter(jax.random.key(1), w0, cfg))
        grads = jax.grad(lambda ad: jnp.sum(factored_dense(x, w0, ad, cfg) * upstream))(adapter)
        merged_grads = jax.grad(lambda ad: jnp.sum((x @ merge_kernel(w0, ad, cfg)) * upstream))(adapter)

        a, b, m = (np.asarray(adapter[k]) for k in "abm")
        x_np, w_np, g = np.asarray(x), np.asarray(w0), np.asarray(upstream)
        s = cfg.scale
        n = np.sqrt(((w_np + s * a @ b) ** 2).sum(axis=0) + NORM_EPS)
        z = x_np @ w_np + s * (x_np @ a) @ b
        h = g * (m / n)
        expected = {"m": (g * z / n).sum(axis=0), "b": s * (x_np @ a).T @ h, "a": s * x_np.T @ (h @ b.T)}
        for key in "abm":
            np.testing.assert_allclose(grads[key], expected[key], rtol=1e-9)
            np.testing.assert_allclose(merged_grads[key], expected[key], rtol=1e-9)


def test_exact_and_detached_gradients_differ_once_the_direction_moved():
    with jax.enable_x64(True):
        w0, x, upstream = _loss_inputs()
        exact = AdapterConfig(rank=4, targets="k", norm_grad="exact", dtype="float64")
        detach = AdapterConfig(rank=4, targets="k", norm_grad="detach", dtype="float64")
        adapter = perturb(init_adapter(jax.random.key(1), w0, exact))
        loss = lambda cfg: jax.grad(lambda ad: jnp.sum(factored_dense(x, w0, ad, cfg) * upstream))(adapter)  # noqa: E731
        assert np.abs(loss(exact)["a"] - loss(detach)["a"]).max() > 1e-3


def test_dropout_applies_to_the_low_rank_branch_only():
    w0 = jax.random.normal(jax.random.key(0), (32, 16))
    cfg = AdapterConfig(method="lora", rank=4, targets="k", dropout=0.5)
    adapter = init_adapter(jax.random.key(1), w0, cfg)  # B = 0: the branch adds nothing
    x = jax.random.normal(jax.random.key(2), (6, 32))
    np.testing.assert_allclose(factored_dense(x, w0, adapter, cfg, dropout_rng=jax.random.key(5)), x @ w0, rtol=1e-6)
    moved = perturb(adapter)
    with_dropout = factored_dense(x, w0, moved, cfg, dropout_rng=jax.random.key(5))
    without = factored_dense(x, w0, moved, cfg)
    assert np.abs(with_dropout - without).max() > 1e-3
    np.testing.assert_allclose(without, x @ merge_kernel(w0, moved, cfg), rtol=1e-5, atol=1e-5)


def test_kernel_layout_round_trips():
    kernel = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    layout = kernel_layout(kernel.shape, (3, 1))
    assert (layout.d_in, layout.d_out, layout.out_shape) == (15, 8, (2, 4))
    np.testing.assert_array_equal(layout.from_matrix(layout.to_matrix(kernel)), kernel)
