"""Only adapter leaves train: masks, partitions, optimizer state and a jitted step that compiles once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax as dj
from conftest import ATTENTION_AXES
from dora_jax import metrics
from dora_jax.core import AdapterConfig

CFG = AdapterConfig(rank=4, targets=r".*/(query|value|up)/kernel", input_axes=ATTENTION_AXES)


def state_size(opt_state):
    return sum(np.size(leaf) for leaf in jax.tree.leaves(opt_state))


def tree_size(tree):
    return sum(np.size(leaf) for leaf in jax.tree.leaves(tree))


def adapted_forward(model, cfg):
    """forward(adapters, params, batch, rng) as ``make_train_step`` takes it."""
    f = dj.inject(model.apply, cfg)
    return lambda adapters, params, batch, rng: f(params, adapters, batch["inputs"], dropout_rng=rng)


def regression_batch(x):
    """Regress ``x`` onto zeros: the mean squared error over every position."""
    return {"inputs": x, "targets": jnp.zeros_like(x), "loss_mask": jnp.ones(x.shape[:-1])}


def test_trainable_mask_marks_adapter_leaves_and_extra_paths(block):
    _, params, _ = block
    tree = {"params": params, "adapters": dj.init_adapters(jax.random.key(0), params, CFG)}
    mask = dj.trainable_mask(tree, extra=r"params/mlp/down/bias")
    trained = {dj.targets.path_str(kp) for kp, keep in jax.tree_util.tree_flatten_with_path(mask)[0] if keep}
    assert trained == {"params/mlp/down/bias"} | {
        f"adapters/{layer}/kernel/{key}" for layer in ("attention/query", "attention/value", "mlp/up") for key in "abm"
    }


def test_partition_then_combine_is_the_identity(block):
    _, params, _ = block
    tree = {"params": params, "adapters": dj.init_adapters(jax.random.key(0), params, CFG)}
    trainable, frozen = dj.partition(tree, dj.trainable_mask(tree))
    assert tree_size(trainable) == tree_size(tree["adapters"]) and tree_size(frozen) == tree_size(params)
    chex.assert_trees_all_equal(dj.combine(trainable, frozen), tree)


def test_adamw_steps_change_only_adapters_and_keep_no_state_for_the_base(block):
    model, params, x = block
    adapters = dj.init_adapters(jax.random.key(0), params, CFG)
    tx = optax.adamw(1e-2)
    step = jax.jit(dj.optim.make_train_step(adapted_forward(model, CFG), tx, metrics.squared_error))
    params_before = jax.tree.map(np.array, params)
    state = dj.optim.init_state(tx, adapters)
    for i in range(3):
        state, _ = step(state, params, regression_batch(x), jax.random.key(i))
    chex.assert_trees_all_equal(params, params_before)
    assert state_size(state["opt_state"]) == 2 * tree_size(adapters) + 1  # mu, nu and the step count
    changed = jax.tree.map(lambda before, after: bool(np.any(before != after)), adapters, state["trainable"])
    assert all(jax.tree.leaves(changed)), changed


def test_masked_optimizer_on_a_combined_tree_leaves_frozen_leaves_bit_identical(block):
    model, params, x = block
    tree = {"params": params, "adapters": dj.init_adapters(jax.random.key(0), params, CFG)}
    mask = dj.trainable_mask(tree)
    tx = dj.masked(optax.adamw(1e-2), mask)
    opt_state = tx.init(tree)
    assert state_size(opt_state) == 2 * tree_size(tree["adapters"]) + 1
    f = dj.inject(model.apply, CFG)
    grad = jax.jit(jax.grad(lambda t: jnp.mean(f(t["params"], t["adapters"], x) ** 2)))
    for _ in range(2):
        grads = grad(tree)
        updates, opt_state = tx.update(grads, opt_state, tree)
        tree = optax.apply_updates(tree, updates)
    chex.assert_trees_all_equal(tree["params"], params)
    initial = dj.init_adapters(jax.random.key(0), params, CFG)
    changed = jax.tree.map(lambda before, after: bool(np.any(before != after)), initial, tree["adapters"])
    assert all(jax.tree.leaves(changed)), changed


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_jitted_train_step_compiles_once(block, method):
    model, params, x = block
    cfg = AdapterConfig(
        method=method, rank=4, targets=r".*/(query|value|up)/kernel", input_axes=ATTENTION_AXES, dropout=0.1
    )
    traces = []
    forward = adapted_forward(model, cfg)

    def counted(*args):
        traces.append(1)
        return forward(*args)

    tx = optax.adamw(1e-3)
    step = jax.jit(dj.optim.make_train_step(counted, tx, metrics.squared_error), donate_argnums=(0,))
    state = dj.optim.init_state(tx, dj.init_adapters(jax.random.key(0), params, cfg))
    losses = []
    for i in range(4):
        state, out = step(state, params, regression_batch(x), jax.random.key(i))
        losses.append(float(out["loss"]))
    assert len(traces) == 1 and step._cache_size() == 1
    assert losses[-1] < losses[0] and int(state["step"]) == 4


def test_accumulated_micro_batches_give_the_whole_batch_gradient(block):
    # Rows weigh unequally (loss_mask), so averaging per-micro-batch means would be wrong; the step
    # divides every micro-batch by the whole batch's count and the sums are exact.
    model, params, x = block
    adapters = jax.tree.map(lambda a: a + 0.01, dj.init_adapters(jax.random.key(0), params, CFG))
    batch = regression_batch(x)
    batch["loss_mask"] = batch["loss_mask"].at[0].set(0.0).at[-1, 1:].set(0.0)
    tx = optax.sgd(1.0)
    results = []
    for accum in (1, 2):
        forward = adapted_forward(model, CFG)
        step = jax.jit(dj.optim.make_train_step(forward, tx, metrics.squared_error, grad_accum=accum))
        results.append(step(dj.optim.init_state(tx, adapters), params, batch, jax.random.key(0)))
    (one, sums_one), (two, sums_two) = results
    chex.assert_trees_all_close(one["trainable"], two["trainable"], atol=1e-6)
    np.testing.assert_allclose(sums_one["loss"], sums_two["loss"], rtol=1e-6)
    np.testing.assert_allclose(sums_one["grad_norm"], sums_two["grad_norm"], rtol=1e-5)
