"""The paper's variants: magnitude-only modules (section 5.6) and per-group learning rates (LoRA+)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dora_jax as dj
from conftest import perturb
from dora_jax import optim, run_config

MAGNITUDE_ONLY = dict(rank=2, targets="up/kernel", magnitude_targets="down/kernel")


# --- magnitude-only modules ----------------------------------------------------------------------


def test_a_magnitude_target_holds_its_column_norms_alone(mlp):
    model, params, _ = mlp
    adapters = dj.init_adapters(jax.random.key(0), params, dj.AdapterConfig(**MAGNITUDE_ONLY))
    assert set(adapters["down"]["kernel"]) == {"m"} and set(adapters["up"]["kernel"]) == {"a", "b", "m"}
    np.testing.assert_allclose(adapters["down"]["kernel"]["m"], np.linalg.norm(params["down"]["kernel"], axis=0))


@pytest.mark.parametrize("forward", ["factored", "folded"])
def test_magnitude_only_model_is_the_base_model_at_init(mlp, forward):
    model, params, x = mlp
    cfg = dj.AdapterConfig(**MAGNITUDE_ONLY, forward=forward)
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(dj.inject(model.apply, cfg, fallback="error")(params, adapters, x), base, atol=1e-6)
    np.testing.assert_allclose(model.apply({"params": dj.merge(params, adapters, cfg)}, x), base, atol=1e-6)


def numpy_magnitude_layer(x, w0, bias, m, g):
    """float64 reference of y = (m / ||W0||_c)(x W0) + b and its gradients for the cotangent g."""
    norm = np.sqrt(np.sum(w0 * w0, axis=0) + dj.core.NORM_EPS)
    z = x @ w0
    y = z * (m / norm) + bias
    dx = (g * (m / norm)) @ w0.T
    dm = np.sum(g * z, axis=0) / norm
    return y, dx, dm


@pytest.mark.parametrize("norm_grad", ["detach", "exact"])
def test_magnitude_only_layer_matches_a_float64_reference(norm_grad):
    # W0 is frozen, so the norm's gradient mode changes nothing: both equal the same reference.
    rng = np.random.default_rng(0)
    x, w0, bias = rng.normal(size=(5, 7)), rng.normal(size=(7, 4)), rng.normal(size=4)
    m, g = rng.uniform(0.5, 2.0, size=4), rng.normal(size=(5, 4))
    cfg = dj.AdapterConfig(targets="k", dtype="float64", norm_grad=norm_grad)
    with jax.enable_x64():

        def layer(x, m):
            return dj.core.magnitude_dense(jnp.asarray(x), jnp.asarray(w0), m, cfg, bias=jnp.asarray(bias))

        y, vjp = jax.vjp(layer, jnp.asarray(x), jnp.asarray(m))
        dx, dm = vjp(jnp.asarray(g))
    ref_y, ref_dx, ref_dm = numpy_magnitude_layer(x, w0, bias, m, g)
    np.testing.assert_allclose(y, ref_y, rtol=1e-12)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12)
    np.testing.assert_allclose(dm, ref_dm, rtol=1e-12)


@pytest.mark.parametrize("forward", ["factored", "folded"])
def test_injected_values_and_gradients_equal_the_merged_model(mlp, forward):
    model, params, x = mlp
    cfg = dj.AdapterConfig(**MAGNITUDE_ONLY, forward=forward)
    adapters = perturb(dj.init_adapters(jax.random.key(0), params, cfg))

    def loss(adapters, f):
        return jnp.sum(jnp.sin(f(adapters)))

    def injected(a):
        return dj.inject(model.apply, cfg, fallback="error")(params, a, x)

    def merged(a):
        return model.apply({"params": dj.merge(params, a, cfg)}, x)

    np.testing.assert_allclose(injected(adapters), merged(adapters), atol=1e-5)
    grads = jax.grad(loss)(adapters, injected), jax.grad(loss)(adapters, merged)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), *grads)
    assert float(jnp.abs(grads[0]["down"]["kernel"]["m"]).max()) > 0


def test_magnitude_only_forward_adds_no_matmul(mlp):
    model, params, x = mlp
    cfg = dj.AdapterConfig(method="dora", rank=2, targets="never/kernel|up/kernel", magnitude_targets="down/kernel")
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    adapters.pop("up")  # only the magnitude-only module is adapted

    def dots(fn, *args):
        return str(jax.make_jaxpr(fn)(*args)).count("dot_general")

    adapted = dots(lambda p, a: dj.inject(model.apply, cfg, fallback="error")(p, a, x), params, adapters)
    assert adapted == dots(lambda p: model.apply({"params": p}, x), params) == 2


def test_target_in_both_sets_is_refused_by_name(mlp):
    _, params, _ = mlp
    cfg = dj.AdapterConfig(rank=2, targets="up/kernel", magnitude_targets=".*/kernel")
    with pytest.raises(dj.ConfigError, match=r"\['up/kernel'\] match both targets and magnitude_targets"):
        dj.init_adapters(jax.random.key(0), params, cfg)


def test_magnitude_targets_need_dora():
    with pytest.raises(dj.ConfigError, match=r"magnitude_targets='down/kernel' needs method='dora'"):
        dj.AdapterConfig(method="lora", targets="up/kernel", magnitude_targets="down/kernel")


def test_magnitude_pattern_that_matches_nothing_lists_the_leaves(mlp):
    _, params, _ = mlp
    cfg = dj.AdapterConfig(rank=2, targets="up/kernel", magnitude_targets="gate/kernel")
    with pytest.raises(dj.TargetError, match=r"'gate/kernel' matches no leaf(.|\n)*down/kernel \(32, 12\)"):
        dj.init_adapters(jax.random.key(0), params, cfg)


def test_magnitude_targets_round_trip_through_a_dict():
    cfg = dj.AdapterConfig(targets="up/kernel", magnitude_targets=("down/kernel", "out/kernel"))
    assert dj.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert dj.AdapterConfig(targets="up/kernel").magnitude_patterns == ()


# --- per-group learning rates and decay ---------------------------------------------------------


def train_config(**overrides):
    t = run_config.defaults().train
    t.update(learning_rate=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.1)
    t.update(magnitude_weight_decay=0.3, magnitude_lr_ratio=0.5, loraplus_ratio=4.0, **overrides)
    return t


def adamw_reference(params, grads, rate, decay, steps):
    """Hand-written AdamW (optax's defaults: b1 0.9, b2 0.999, eps 1e-8) on one array, for ``steps`` steps."""
    params = params.astype(np.float64)
    mu, nu, p = np.zeros_like(params), np.zeros_like(params), params.copy()
    for t in range(1, steps + 1):
        g = grads[t - 1].astype(np.float64)
        mu, nu = 0.9 * mu + 0.1 * g, 0.999 * nu + 0.001 * g * g
        update = (mu / (1 - 0.9**t)) / (np.sqrt(nu / (1 - 0.999**t)) + 1e-8)
        p = p - rate * (update + decay * p)
    return p


def test_each_group_takes_an_adamw_step_with_its_own_rate_and_decay(mlp):
    _, params, _ = mlp
    adapters = perturb(dj.init_adapters(jax.random.key(0), params, dj.AdapterConfig(**MAGNITUDE_ONLY)))
    trainable = {"adapters": adapters, "params": {"head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}}
    tx = optim.make_optimizer(train_config(), trainable)
    grads = [jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.key(k), p.shape), trainable) for k in range(2)]
    state, current = tx.init(trainable), trainable
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
    expected = {  # (rate, decay) per leaf
        ("adapters", "up", "kernel", "a"): (0.1, 0.1),
        ("adapters", "up", "kernel", "b"): (0.4, 0.1),  # LoRA+: B at 4x A's rate
        ("adapters", "up", "kernel", "m"): (0.05, 0.3),
        ("adapters", "down", "kernel", "m"): (0.05, 0.3),
        ("params", "head", "kernel"): (0.1, 0.1),
        ("params", "head", "bias"): (0.1, 0.0),  # no decay on vectors outside adapters
    }
    for path, (rate, decay) in expected.items():

        def leaf(tree, path=path):
            for key in path:
                tree = tree[key]
            return np.asarray(tree)

        reference = adamw_reference(leaf(trainable), [leaf(g) for g in grads], rate, decay, steps=2)
        # float32 bias corrections (1 - 0.999**2) round at ~1e-5 of an update; a wrong rate or decay is 1e-3 off
        np.testing.assert_allclose(leaf(current), reference, atol=1e-5, err_msg=str(path))


def test_group_labels_name_a_b_m_and_everything_else(mlp):
    _, params, _ = mlp
    adapters = dj.init_adapters(jax.random.key(0), params, dj.AdapterConfig(**MAGNITUDE_ONLY))
    labels = optim.group_labels({"adapters": adapters, "params": {"head": {"kernel": jnp.ones((3, 2))}, "x": None}})
    assert labels == {
        "adapters": {"down": {"kernel": {"m": "m"}}, "up": {"kernel": {"a": "a", "b": "b", "m": "m"}}},
        "params": {"head": {"kernel": "other"}, "x": None},
    }


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loraplus_ratio", 0.0, r"train.loraplus_ratio: expected a positive number; got 0.0"),
        ("magnitude_lr_ratio", -1.0, r"train.magnitude_lr_ratio: expected a positive number; got -1.0"),
        ("magnitude_weight_decay", -0.1, r"train.magnitude_weight_decay: expected a non-negative number"),
    ],
)
def test_bad_group_settings_are_refused_by_key(key, value, message):
    config = run_config.defaults()
    config.train[key] = value
    with pytest.raises(dj.ConfigError, match=message):
        run_config.check(config)


def test_a_stored_decay_magnitude_flag_reads_as_the_magnitude_decay():
    assert run_config.upgrade({"train.weight_decay": 0.1, "train.decay_magnitude": True}) == {
        "train.weight_decay": 0.1,
        "train.magnitude_weight_decay": 0.1,
        "train.finetune": "adapter",
        "model.scan_layers": False,  # keys added since: what earlier versions did
        "model.attention": "auto",
        "model.quantize": "none",
        "model.quantize_block": -1,
        "adapter.stacked_axes": {},
    }
    assert (
        run_config.upgrade({"train.weight_decay": 0.1, "train.decay_magnitude": False})["train.magnitude_weight_decay"]
        == 0.0
    )


# --- VeRA and DVoRA ---------------------------------------------------------------------------------


def numpy_vector_layer(x, w0, bias, shared_a, shared_b, lambda_d, lambda_b, m):
    """float64 reference of VeRA (m None) and DVoRA, from the formulas: dW = (A_s diag(ld)) (B_s diag(lb)),
    W' = W0 + dW (VeRA) or m (W0 + dW) / ||W0 + dW||_c (DVoRA); returns y and the norm used."""
    d_in, d_out = w0.shape
    v = w0 + (shared_a[:d_in] * lambda_d) @ (shared_b[:, :d_out] * lambda_b)
    if m is None:
        return x @ v + bias, None
    norm = np.sqrt(np.sum(v * v, axis=0) + dj.core.NORM_EPS)
    return x @ (m * v / norm) + bias, norm


def finite_difference(loss, values, step=1e-6):
    """Central differences of ``loss(values)`` for each entry of each array in ``values`` (float64)."""
    grads = []
    for i, value in enumerate(values):
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            plus, minus = [v.copy() for v in values], [v.copy() for v in values]
            plus[i][index] += step
            minus[i][index] -= step
            grad[index] = (loss(plus) - loss(minus)) / (2 * step)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("method, norm_grad", [("vera", "detach"), ("dvora", "exact"), ("dvora", "detach")])
def test_vector_layer_values_and_gradients_match_the_float64_formula(method, norm_grad):
    # The projections are larger than the layer (9 x 3 and 3 x 6 for a 7 x 4 kernel): the slices count.
    rng = np.random.default_rng(0)
    x, w0, bias, g = rng.normal(size=(5, 7)), rng.normal(size=(7, 4)), rng.normal(size=4), rng.normal(size=(5, 4))
    shared_a, shared_b = rng.normal(size=(9, 3)), rng.normal(size=(3, 6))
    lambda_d, lambda_b, m = rng.normal(size=3), rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    magnitude = m if method == "dvora" else None
    _, norm0 = numpy_vector_layer(x, w0, bias, shared_a, shared_b, lambda_d, lambda_b, magnitude)

    def loss(values):  # detach: the norm is a constant, its value at the point differentiated
        ld, lb, *rest = values
        if magnitude is None:
            return np.sum(g * numpy_vector_layer(x, w0, bias, shared_a, shared_b, ld, lb, None)[0])
        y, norm = numpy_vector_layer(x, w0, bias, shared_a, shared_b, ld, lb, rest[0])
        return np.sum(g * (y if norm_grad == "exact" else (y - bias) * norm / norm0 + bias))

    cfg = dj.AdapterConfig(method=method, rank=3, targets="k", dtype="float64", norm_grad=norm_grad)
    projection = {"shared_a": shared_a, "shared_b": shared_b}
    with jax.enable_x64():

        def layer(*values):
            adapter = dict(zip(["lambda_d", "lambda_b", "m"], values, strict=False))
            matrices = dj.core.kernel_layout(w0.shape).adapter_matrices(adapter, projection)
            return dj.core.factored_dense(jnp.asarray(x), jnp.asarray(w0), matrices, cfg, bias=jnp.asarray(bias))

        values = [lambda_d, lambda_b] + ([m] if magnitude is not None else [])
        y, vjp = jax.vjp(layer, *map(jnp.asarray, values))
        grads = vjp(jnp.asarray(g))
    np.testing.assert_allclose(y, numpy_vector_layer(x, w0, bias, shared_a, shared_b, *values[:2], magnitude)[0])
    for ours, reference in zip(grads, finite_difference(loss, values), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vector_adapters_start_as_the_base_model_and_inject_equals_merge(mlp, method):
    model, params, x = mlp
    cfg = dj.AdapterConfig(method=method, rank=24, targets="(up|down)/kernel")  # r above a layer's d_out (12)
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    assert adapters["vera_projection"]["shared_a"].shape == (32, 24)  # the largest d_in (down: 32)
    assert adapters["vera_projection"]["shared_b"].shape == (24, 32)  # the largest d_out (up: 32)
    np.testing.assert_allclose(adapters["up"]["kernel"]["lambda_d"], 0.1)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(dj.inject(model.apply, cfg, fallback="error")(params, adapters, x), base, atol=1e-6)
    moved = perturb(adapters)
    injected = dj.inject(model.apply, cfg, fallback="error")(params, moved, x)
    np.testing.assert_allclose(injected, model.apply({"params": dj.merge(params, moved, cfg)}, x), atol=1e-5)
    assert float(jnp.abs(injected - base).max()) > 1e-2


def test_shared_projections_get_no_update_and_no_optimizer_state(mlp):
    _, params, _ = mlp
    adapters = dj.init_adapters(
        jax.random.key(0), params, dj.AdapterConfig(method="dvora", rank=4, targets="up/kernel")
    )
    trainable = {"adapters": adapters, "params": {}}
    assert optim.group_labels(trainable)["adapters"]["vera_projection"] == {"shared_a": "frozen", "shared_b": "frozen"}
    assert dj.trainable_mask(adapters)["vera_projection"] == {"shared_a": False, "shared_b": False}
    tx = optim.make_optimizer(train_config(), trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    assert not np.any(updates["adapters"]["vera_projection"]["shared_a"])
    assert np.all(updates["adapters"]["up"]["kernel"]["lambda_d"] != 0)


def test_vector_adapter_without_its_projections_is_named(mlp):
    model, params, x = mlp
    cfg = dj.AdapterConfig(method="vera", rank=4, targets="up/kernel")
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    del adapters["vera_projection"]
    with pytest.raises(dj.ShapeError, match=r"needs the shared projections at adapters\['vera_projection'\]"):
        dj.merge(params, adapters, cfg)
