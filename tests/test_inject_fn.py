"""dj.inject_fn: adapters for any function of a parameter pytree (Flax NNX, plain JAX, Equinox) equal
``fn(merge(params, adapters), ...)`` in values and adapter gradients, through the factored forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax as dj
from conftest import perturb

NNX_AXES = {r"out/kernel": (0, 1), r"(attention|einsum)/kernel": (0,), r"conv/kernel": (0, 1)}


class Tied(nnx.Module):
    """The five NNX layer types: an embedding table read as a lookup and as a tied head, a 1-D
    convolution, Linear, LinearGeneral in (d -> heads x head_dim) and out ((heads, head_dim) -> d), Einsum."""

    def __init__(self, dtype, rngs):
        kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
        self.embed = nnx.Embed(12, 8, **kw)
        self.conv = nnx.Conv(8, 8, (3,), **kw)
        self.up = nnx.Linear(8, 16, **kw)
        self.attention = nnx.LinearGeneral(16, (2, 4), **kw)
        self.einsum = nnx.Einsum("btd,dhk->bthk", (16, 2, 4), **kw)
        self.out = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), **kw)

    def __call__(self, ids):
        h = jax.nn.gelu(self.up(self.conv(self.embed(ids))))
        return self.embed.attend(self.out(self.attention(h) + self.einsum(h)))


def nnx_case(dtype):
    graph, state = nnx.split(Tied(dtype, nnx.Rngs(0)))

    def fn(params, ids):
        return nnx.merge(graph, params)(ids)

    ids = jax.random.randint(jax.random.key(3), (2, 5), 0, 12)
    return fn, state, (ids,), dict(targets=r".*/(kernel|embedding)", input_axes=NNX_AXES)


def plain_case(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
        "up": {"w": jax.random.normal(keys[0], (8, 16), dtype), "b": jnp.zeros(16, dtype)},
        "down": {"w": jax.random.normal(keys[1], (16, 4), dtype)},
    }

    def fn(params, x):  # a matmul and an einsum over the transposed kernel
        h = jax.nn.gelu(x @ params["up"]["w"] + params["up"]["b"])
        return jnp.einsum("bh,oh->bo", h, params["down"]["w"].T)

    return fn, params, (jax.random.normal(keys[2], (3, 8), dtype),), dict(targets=r".*/w")


def equinox_case(dtype):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(8, 4, 16, depth=2, key=jax.random.key(0), dtype=dtype)
    params, static = eqx.partition(model, eqx.is_array)

    def fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    x = jax.random.normal(jax.random.key(2), (3, 8), dtype)
    return fn, params, (x,), dict(targets=r"layers/\d+/weight", input_axes={r".*weight": (1,)})  # (out, in)


class Block(nnx.Module):
    def __init__(self, dtype, rngs):
        self.linear = nnx.Linear(8, 8, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class Scanned(nnx.Module):
    """Three blocks made with nnx.vmap (kernels stacked (3, 8, 8)) and run with nnx.scan, then a head."""

    def __init__(self, dtype, rngs):
        self.blocks = nnx.vmap(lambda key: Block(dtype, nnx.Rngs(key)))(jax.random.split(jax.random.key(5), 3))
        self.head = nnx.Linear(8, 4, param_dtype=dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        step = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.head(step(x, self.blocks))


def nnx_scan_case(dtype):
    graph, state = nnx.split(Scanned(dtype, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (3, 8), dtype)
    return lambda p, x: nnx.merge(graph, p)(x), state, (x,), dict(targets=r".*/kernel", stacked_axes={"blocks/.*": 1})


def jax_scan_case(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"layers": {"w": jax.random.normal(keys[0], (3, 8, 8), dtype) / 3, "b": jnp.zeros((3, 8), dtype)}}
    params["head"] = jax.random.normal(keys[1], (8, 4), dtype)

    def fn(params, x):  # lax.scan over the stacked layers
        h, _ = jax.lax.scan(lambda h, layer: (jnp.tanh(h @ layer["w"] + layer["b"]), None), x, params["layers"])
        return h @ params["head"]

    x = jax.random.normal(keys[2], (3, 8), dtype)
    return fn, params, (x,), dict(targets=r"layers/w|head", stacked_axes={"layers/w": 1})


CASES = {
    "nnx": nnx_case,
    "plain_jax": plain_case,
    "equinox": equinox_case,
    "nnx_scan": nnx_scan_case,
    "jax_scan": jax_scan_case,
}


@pytest.mark.parametrize("method", ["dora", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapted_function_equals_the_merged_one_in_values_and_adapter_gradients_float64(case, method):
    with jax.enable_x64(True):
        fn, params, args, kw = CASES[case](jnp.float64)
        cfg = dj.AdapterConfig(method=method, rank=2, dtype="float64", fallback="error", **kw)
        adapters = perturb(dj.init_adapters(jax.random.key(4), params, cfg))
        adapted = dj.inject_fn(fn, cfg)  # fallback="error": every targeted leaf takes the factored path

        def factored(adapters):
            return adapted(params, adapters, *args)

        def merged(adapters):
            return fn(dj.merge(params, adapters, cfg), *args)

        def close(got, want):  # to 1e-10 of the array's scale (gradients reach ~1e4 through the tied head)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())

        close(jax.jit(factored)(adapters), jax.jit(merged)(adapters))
        grads = [jax.jit(jax.grad(lambda a, f=f: jnp.sum(jnp.sin(f(a)))))(adapters) for f in (factored, merged)]
        jax.tree.map(close, *grads)


@pytest.mark.parametrize("forward", ["factored", "folded"])
def test_nnx_model_in_float32_under_jit_equals_the_merged_one(forward):
    fn, params, args, kw = nnx_case(jnp.float32)
    cfg = dj.AdapterConfig(rank=2, forward=forward, fallback="error", **kw)
    adapters = perturb(dj.init_adapters(jax.random.key(4), params, cfg))
    adapted = jax.jit(dj.inject_fn(fn, cfg))
    np.testing.assert_allclose(adapted(params, adapters, *args), fn(dj.merge(params, adapters, cfg), *args), atol=1e-5)


def test_nnx_state_and_its_pure_dict_name_the_same_leaves():
    _, state, _, kw = nnx_case(jnp.float32)
    cfg = dj.AdapterConfig(rank=2, **kw)
    from_state = dj.init_adapters(jax.random.key(0), state, cfg)
    from_dict = dj.init_adapters(jax.random.key(0), nnx.to_pure_dict(state), cfg)
    jax.tree.map(np.testing.assert_array_equal, from_state, from_dict)
    assert set(from_state) == {"embed", "conv", "up", "attention", "einsum", "out"}


def test_a_leaf_read_by_another_operation_is_merged_there_or_named_with_fallback_error():
    def fn(params, x):  # the kernel's sum is not a product the factored forward computes
        return x @ params["w"] + jnp.sum(params["w"])

    params, x = {"w": jax.random.normal(jax.random.key(0), (4, 3))}, jnp.ones((2, 4))
    cfg = dj.AdapterConfig(rank=2, targets="w")
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    merged = fn(dj.merge(params, adapters, cfg), x)
    np.testing.assert_allclose(dj.inject_fn(fn, cfg)(params, adapters, x), merged, rtol=1e-6)
    strict = dj.AdapterConfig(rank=2, targets="w", fallback="error")
    with pytest.raises(dj.InjectError, match=r"^w: is read by reduce_sum; inject_fn merges it there"):
        dj.inject_fn(fn, strict)(params, adapters, x)


def test_the_factored_train_step_needs_fewer_flops_than_differentiating_the_merge():
    def fn(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(keys[0], (256, 512)), "w2": jax.random.normal(keys[1], (512, 256))}
    x = jax.random.normal(keys[2], (8, 256))  # few tokens: x^T g of a full weight gradient dominates
    cfg = dj.AdapterConfig(rank=4, targets="w.", fallback="error")
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)

    def flops(apply):
        step = jax.jit(jax.grad(lambda a: jnp.sum(apply(a) ** 2)))
        return step.lower(adapters).compile().cost_analysis()["flops"]

    factored = flops(lambda a: dj.inject_fn(fn, cfg)(params, a, x))
    merged = flops(lambda a: fn(dj.merge(params, a, cfg), x))
    assert factored < 0.7 * merged


def test_an_nnx_model_exports_its_adapter_to_peft_by_a_module_mapping_and_peft_gives_its_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(12, 3))
    model = nnx.Sequential(nnx.Linear(6, 12, rngs=nnx.Rngs(0)), nnx.gelu, nnx.Linear(12, 3, rngs=nnx.Rngs(1)))
    graph, state = nnx.split(model)
    weights = {f"layers/{i}/{name}": getattr(net[i], "weight" if name == "kernel" else "bias") for i in (0, 2)
               for name in ("kernel", "bias")}  # fmt: skip
    state = jax.tree_util.tree_map_with_path(  # the twin's weights, (out, in) -> Flax's (in, out)
        lambda kp, leaf: jnp.asarray(weights[dj.targets.path_str(kp)].detach().numpy().T), state
    )
    modules = {"layers/0/kernel": "0", "layers/2/kernel": "2"}  # Flax leaf path -> PyTorch module name
    cfg = dj.AdapterConfig(rank=2, alpha=4, targets=r"layers/\d+/kernel")
    adapters = perturb(dj.init_adapters(jax.random.key(1), state, cfg))
    dj.io.export_peft(adapters, cfg, tmp_path, modules=modules, params=state)
    x = np.random.default_rng(0).standard_normal((4, 6), dtype=np.float32)
    ours = dj.inject_fn(lambda p, x: nnx.merge(graph, p)(x), cfg)(state, adapters, jnp.asarray(x))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    again, _ = dj.io.import_peft(tmp_path, state, modules=modules)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)


def test_nnx_optimizer_over_dj_nnx_adapter_trains_the_adapters_alone_and_merged_is_the_tuned_model():
    import optax

    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    base = nnx.state(model, nnx.Param)
    cfg = dj.AdapterConfig(rank=2, targets=r"layers/\d+/kernel", fallback="error")
    adapted = dj.nnx.Adapted(model, cfg, rngs=nnx.Rngs(2))
    x, y = jax.random.normal(jax.random.key(3), (6, 8)), jnp.zeros((6, 4))
    np.testing.assert_allclose(adapted(x), model(x), atol=1e-6)  # B = 0, m = ||W0||: the identity at init
    optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=dj.nnx.Adapter)

    @nnx.jit
    def train_step(adapted, optimizer):
        loss = lambda adapted: jnp.mean((adapted(x) - y) ** 2)  # noqa: E731
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, dj.nnx.Adapter))(adapted)
        optimizer.update(adapted, grads)
        return value

    losses = [float(train_step(adapted, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    # the optimizer holds state for the adapters only, and the model's own parameters did not move
    opt_paths = {dj.targets.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(nnx.state(optimizer))}
    moments = {p for p in opt_paths if "/mu/" in p or "/nu/" in p}  # Adam's two moments, one per adapter array
    assert moments and all("/adapters/" in p for p in moments) and opt_paths - moments <= {"step", "opt_state/0/count"}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), base)
    np.testing.assert_allclose(adapted.merged()(x), adapted(x), atol=1e-5)
    graph, params = nnx.split(model)  # the adapter as a plain tree: inject_fn over the model's own state
    plain = dj.inject_fn(lambda p, x: nnx.merge(graph, p)(x), cfg)(params, adapted.adapter_tree(), x)
    np.testing.assert_allclose(adapted(x), plain, atol=1e-6)


def test_a_quantized_nnx_model_adapts_like_its_dequantized_values_and_keeps_the_codes_for_the_backward(capsys):
    from jax.ad_checkpoint import print_saved_residuals

    from dora_jax.core import quantize

    model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(64, 32, rngs=nnx.Rngs(1)))
    graph, state = nnx.split(model)
    quantized = quantize.quantize_params(state, "nf4", 16)  # both kernels NF4; the second stays frozen
    cfg = dj.AdapterConfig(rank=2, targets=r"layers/0/kernel", fallback="error")
    adapters = perturb(dj.init_adapters(jax.random.key(1), quantized, cfg))
    adapted = dj.inject_fn(lambda p, x: nnx.merge(graph, p)(x), cfg)
    x = jax.random.normal(jax.random.key(2), (4, 32))

    def loss(adapters, params):
        return jnp.sum(adapted(params, adapters, x) ** 2)

    dequantized = quantize.dequantize_tree(quantized)
    np.testing.assert_allclose(adapted(quantized, adapters, x), adapted(dequantized, adapters, x), atol=1e-6)
    grads = [jax.jit(jax.grad(loss))(adapters, p) for p in (quantized, dequantized)]
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5), *grads)
    print_saved_residuals(loss, adapters, quantized)
    saved = capsys.readouterr().out.splitlines()
    assert any(line.startswith("u4[32,64]") for line in saved)  # the codes, not the f32 kernels, are kept
    assert not [line for line in saved if line.split(" ")[0] in ("f32[32,64]", "f32[64,32]") and "argument" not in line]


class Remat(nnx.Module):
    """A residual block called through nnx.remat (a checkpoint equation whose body reads the kernels and
    hands the module's state back)."""

    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda block, x: x + block.down(jax.nn.gelu(block.up(x))))(self, x)


def remat_case(kind):
    """An NNX block under nnx.remat, or a plain-JAX function under jax.checkpoint."""
    if kind == "nnx_remat":
        graph, state = nnx.split(Remat(nnx.Rngs(0)))
        return (lambda p, x: nnx.merge(graph, p)(x)), state
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    return jax.checkpoint(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"]), params


@pytest.mark.parametrize("kind", ["nnx_remat", "jax_checkpoint"])
def test_kernels_read_inside_a_remat_are_routed_under_the_same_remat(kind):
    fn, params = remat_case(kind)
    cfg = dj.AdapterConfig(rank=2, targets=r".*(kernel|w)", fallback="error")  # no leaf may fall back to merge
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    x = jax.random.normal(jax.random.key(2), (3, 8))
    merged = lambda a: fn(dj.merge(params, a, cfg), x)  # noqa: E731
    adapted = lambda a: dj.inject_fn(fn, cfg)(params, a, x)  # noqa: E731
    np.testing.assert_allclose(adapted(adapters), merged(adapters), rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(lambda a, f=f: jnp.sum(f(a) ** 2)))(adapters) for f in (adapted, merged)]
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4), *grads)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_and_dvora_adapters_route_through_inject_fn_like_merge(method):
    fn, params, args, kw = plain_case(jnp.float32)
    cfg = dj.AdapterConfig(method=method, rank=4, fallback="error", **kw)  # shared frozen projections
    adapters = perturb(dj.init_adapters(jax.random.key(4), params, cfg))
    expected = fn(dj.merge(params, adapters, cfg), *args)
    np.testing.assert_allclose(dj.inject_fn(fn, cfg)(params, adapters, *args), expected, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_follows_its_key_and_is_off_without_one():
    fn, params, args, kw = plain_case(jnp.float32)
    cfg = dj.AdapterConfig(rank=2, dropout=0.5, **kw)
    adapters = perturb(dj.init_adapters(jax.random.key(4), params, cfg))
    adapted = dj.inject_fn(fn, cfg)
    keyed = [adapted(params, adapters, *args, dropout_rng=jax.random.key(k)) for k in (0, 0, 1)]
    np.testing.assert_array_equal(keyed[0], keyed[1])  # the same key, the same masks
    assert np.abs(keyed[0] - keyed[2]).max() > 1e-3  # another key, other masks
    merged = fn(dj.merge(params, adapters, cfg), *args)  # no key: no dropout, the merged model's outputs
    np.testing.assert_allclose(adapted(params, adapters, *args), merged, rtol=1e-5, atol=1e-5)


def test_a_kernel_convolved_as_the_input_is_merged_there_or_named_with_fallback_error():
    def fn(params, x):  # the kernel is the convolution's lhs: no factored form
        return jax.lax.conv_general_dilated(params["w"].reshape(1, 1, 6, 6), x, (1, 1), "SAME")  # NCHW, OIHW

    params, x = {"w": jax.random.normal(jax.random.key(0), (6, 6))}, jnp.ones((2, 1, 3, 3))
    cfg = dj.AdapterConfig(rank=2, targets="w")
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    merged = fn(dj.merge(params, adapters, cfg), x)
    np.testing.assert_allclose(dj.inject_fn(fn, cfg)(params, adapters, x), merged, rtol=1e-5, atol=1e-5)
    with pytest.raises(dj.InjectError, match="^w: is read by a convolution that is not Flax's"):
        dj.inject_fn(fn, dj.AdapterConfig(rank=2, targets="w", fallback="error"))(params, adapters, x)


def test_a_stacked_kernel_gets_one_adapter_per_layer_merged_as_that_layer_alone():
    fn, params, args, kw = jax_scan_case(jnp.float32)
    cfg = dj.AdapterConfig(rank=2, **kw)
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    stacked = adapters["layers"]["w"]
    assert {k: v.shape for k, v in stacked.items()} == {"a": (3, 8, 2), "b": (3, 2, 8), "m": (3, 8)}
    assert not np.allclose(stacked["a"][0], stacked["a"][1])  # each layer its own initial A
    merged = dj.merge(params, adapters, cfg)["layers"]["w"]
    alone = dj.AdapterConfig(rank=2, targets="w")
    for layer in range(3):
        one = dj.merge({"w": params["layers"]["w"][layer]}, {"w": {k: v[layer] for k, v in stacked.items()}}, alone)
        np.testing.assert_allclose(merged[layer], one["w"], rtol=1e-6)


def test_a_scan_over_stacked_kernels_trains_with_fewer_flops_than_the_merge():
    fn, params, args, kw = jax_scan_case(jnp.float32)
    cfg = dj.AdapterConfig(rank=2, fallback="error", **kw)
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)

    def flops(apply):
        return jax.jit(jax.grad(lambda a: jnp.sum(apply(a) ** 2))).lower(adapters).compile().cost_analysis()["flops"]

    assert flops(lambda a: dj.inject_fn(fn, cfg)(params, a, *args)) < flops(
        lambda a: fn(dj.merge(params, a, cfg), *args)
    )


def test_a_stacked_kernel_read_outside_a_scan_is_merged_there_or_named_with_fallback_error():
    def fn(params, x):  # every layer at once, an einsum over the stack
        return jnp.einsum("bi,lio->blo", x, params["w"])

    params, x = {"w": jax.random.normal(jax.random.key(0), (3, 4, 5))}, jnp.ones((2, 4))
    cfg = dj.AdapterConfig(rank=2, targets="w", stacked_axes={"w": 1})
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    np.testing.assert_allclose(
        dj.inject_fn(fn, cfg)(params, adapters, x), fn(dj.merge(params, adapters, cfg), x), rtol=1e-6
    )
    strict = dj.AdapterConfig(rank=2, targets="w", stacked_axes={"w": 1}, fallback="error")
    with pytest.raises(dj.InjectError, match=r"^w: is stacked along leading layer axes .* outside a scan"):
        dj.inject_fn(fn, strict)(params, adapters, x)


def test_stacked_axes_errors_name_the_problem(tmp_path):
    with pytest.raises(dj.ConfigError, match=r"stacked_axes needs method 'dora' or 'lora'; got method='vera'"):
        dj.AdapterConfig(method="vera", targets="w", stacked_axes={"w": 1})
    with pytest.raises(dj.ConfigError, match=r"stacked_axes\['w'\]: expected a positive number of leading axes"):
        dj.AdapterConfig(targets="w", stacked_axes={"w": 0})
    cfg = dj.AdapterConfig(rank=2, targets="w", stacked_axes={"w": 1})
    params = {"w": jnp.ones((3, 4, 5))}
    with pytest.raises(dj.ConfigError, match=r"\['w'\] hold stacks of layers .* PEFT names one module per layer"):
        dj.io.export_peft(
            dj.init_adapters(jax.random.key(0), params, cfg), cfg, tmp_path, modules={"w": "w"}, params=params
        )
