"""Adapted convolutions (nn.Conv of any spatial rank) through ``inject``, and PEFT's ConvNd adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import perturb
from dora_jax.errors import ShapeError, TargetError


class Convs(nn.Module):
    """A 3-D, a 2-D and a 1-D convolution with the options nn.Conv pads and strides by."""

    @nn.compact
    def __call__(self, x):  # (batch, 4, 4, 6, 3)
        x = nn.Conv(5, (2, 3, 3), padding="SAME", kernel_dilation=(1, 2, 1), name="c3")(x)
        x = nn.gelu(x).reshape(x.shape[0], 16, 6, 5)
        x = nn.Conv(7, (3, 3), strides=(2, 1), padding="CIRCULAR", name="c2")(x)
        x = nn.gelu(x).reshape(x.shape[0], 48, 7)
        return nn.Conv(4, 3, strides=2, padding=((2, 0),), use_bias=False, name="c1")(x)


AXES = {"c3/kernel": (0, 1, 2, 3), "c2/kernel": (0, 1, 2), "c1/kernel": (0, 1)}


@pytest.fixture(scope="module")
def convs():
    model, x = Convs(), jax.random.normal(jax.random.key(1), (2, 4, 4, 6, 3))
    return model, model.init(jax.random.key(0), x)["params"], x


def test_a_conv_adapter_has_peft_shapes_and_leaves_the_model_unchanged(convs):
    model, params, x = convs
    cfg = dj.AdapterConfig(rank=2, targets=".*/kernel", input_axes=AXES)
    adapters = dj.init_adapters(jax.random.key(2), params, cfg)
    a, b, m = (adapters["c2"]["kernel"][k] for k in "abm")
    assert (a.shape, b.shape, m.shape) == ((3, 3, 5, 2), (2, 7), (7,)) and not b.any()
    bound = 1 / (3 * 3 * 5) ** 0.5  # PEFT: kaiming_uniform(a=sqrt(5)) over lora_A's fan-in, window x c_in
    assert float(jnp.abs(a).max()) <= bound < 1.25 * float(jnp.abs(a).max())
    np.testing.assert_allclose(m, np.linalg.norm(params["c2"]["kernel"].reshape(-1, 7), axis=0), rtol=1e-6)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(dj.inject(model.apply, cfg, fallback="error")(params, adapters, x), base, atol=1e-6)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dora", {"norm_grad": "exact"}),
        ("dora", {"norm_grad": "detach", "dropout": 0.0}),
        ("lora", {}),
        ("dvora", {"rank": 4}),
        ("dora", {"targets": "c3/kernel|c1/kernel", "magnitude_targets": "c2/kernel"}),
    ],
    ids=["dora_exact", "dora_detach", "lora", "dvora", "magnitude_only"],
)
def test_convolutions_equal_the_merged_kernel_in_values_and_gradients(convs, method, extra):
    model, params, x = convs
    cfg = dj.AdapterConfig(**{"method": method, "rank": 2, "targets": ".*/kernel", "input_axes": AXES, **extra})
    adapters = perturb(dj.init_adapters(jax.random.key(3), params, cfg))  # float32, then widened: few eager ops
    with jax.enable_x64(True):
        params64, x64, adapters = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (params, x, adapters))
        cfg = dj.AdapterConfig(**{**cfg.to_dict(), "dtype": "float64"})
        assert dj.merged_targets(model.apply, cfg, params64, adapters, x64) == {}  # every conv routed

        def injected(a):
            return dj.inject(model.apply, cfg)(params64, a, x64)

        def merged(a):
            return model.apply({"params": dj.merge(params64, a, cfg)}, x64)

        @jax.jit  # one program for both paths' outputs and gradients
        def both(a):
            loss = lambda a, f: (jnp.sum(jnp.sin(f(a))), f(a))  # noqa: E731
            return [jax.grad(loss, has_aux=True)(a, f) for f in (injected, merged)]

        (grads, out), (expected_grads, expected) = both(adapters)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-10), grads, expected_grads)


def test_dropout_on_a_conv_drops_the_low_rank_input_only(convs):
    model, params, x = convs
    cfg = dj.AdapterConfig(rank=2, targets="c2/kernel", input_axes=AXES, dropout=0.5)
    adapters = perturb(dj.init_adapters(jax.random.key(3), params, cfg))
    f = dj.inject(model.apply, cfg)
    dropped = f(params, adapters, x, dropout_rng=jax.random.key(5))
    assert not np.allclose(dropped, f(params, adapters, x))
    # without its low-rank branch the layer is (m/n) conv(x, W0): dropout leaves that part alone
    no_branch = {"c2": {"kernel": {**adapters["c2"]["kernel"], "b": jnp.zeros((2, 7))}}}
    np.testing.assert_allclose(
        f(params, no_branch, x, dropout_rng=jax.random.key(5)), f(params, no_branch, x), rtol=1e-6, atol=1e-6
    )


class Special(nn.Module):
    """Convolutions inject cannot route (grouped, masked) and a plain one."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3,), feature_group_count=2, name="grouped")(x)
        x = nn.Conv(4, (2,), mask=jnp.ones((2, 6, 4)), name="masked")(x)
        return nn.Conv(4, (2,), name="plain")(x)


def test_grouped_masked_or_wrongly_contracted_convs_are_merged_with_the_reason():
    model, x = Special(), jax.random.normal(jax.random.key(0), (2, 8, 4))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = dj.AdapterConfig(rank=2, targets="(grouped|masked)/kernel", input_axes={".*/kernel": (0, 1)})
    adapters = perturb(dj.init_adapters(jax.random.key(2), params, cfg))
    reasons = dj.merged_targets(model.apply, cfg, params, adapters, x)
    assert set(reasons) == {"grouped/kernel", "masked/kernel"}
    assert all("feature_group_count > 1" in why for why in reasons.values())
    np.testing.assert_allclose(
        dj.inject(model.apply, cfg)(params, adapters, x),
        model.apply({"params": dj.merge(params, adapters, cfg)}, x),
        rtol=1e-6,
        atol=1e-6,
    )
    wrong = dj.AdapterConfig(rank=2, targets="plain/kernel", input_axes={".*/kernel": (0,)})
    why = dj.merged_targets(model.apply, wrong, params, dj.init_adapters(jax.random.key(2), params, wrong), x)
    assert why == {
        "plain/kernel": "input_axes (0,) differ from the axes nn.Conv contracts (0, 1) "
        "(window and input channels; add an input_axes rule)"
    }


class Wide(nn.Module):
    """Two 3x3 convolutions of 64 channels: wide against a rank of 4, as real layers are."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(64, (3, 3), name="second")(nn.relu(nn.Conv(64, (3, 3), name="first")(x)))


def test_the_factored_conv_step_costs_less_than_differentiating_the_merged_kernel():
    model, x = Wide(), jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = dj.AdapterConfig(rank=4, targets=".*/kernel", input_axes={".*/kernel": (0, 1, 2)})
    adapters = dj.init_adapters(jax.random.key(2), params, cfg)

    def flops(forward):
        step = jax.jit(jax.grad(lambda a: jnp.sum(forward(a) ** 2)))
        return step.lower(adapters).compile().cost_analysis()["flops"]

    factored = flops(lambda a: dj.inject(model.apply, cfg)(params, a, x))
    merged = flops(lambda a: model.apply({"params": dj.merge(params, a, cfg)}, x))
    # merged: the 64-channel weight gradient of each layer; factored: a 4-channel one
    assert factored < 0.8 * merged, (factored, merged)


# --- PEFT's Conv1d / Conv2d / Embedding adapters, on a PyTorch model with a Flax twin -------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

MODULES = {"embed/embedding": "embed", "conv1/kernel": "conv1", "conv2/kernel": "conv2", "out/kernel": "out"}
TWIN_AXES = {"conv1/kernel": (0, 1), "conv2/kernel": (0, 1, 2)}


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 6)
        self.conv1 = torch.nn.Conv1d(6, 8, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 10, kernel_size=3, stride=2, padding=1)
        self.out = torch.nn.Linear(10, 5)

    def forward(self, ids):
        h = torch.relu(self.conv1(self.embed(ids).transpose(1, 2)))  # (batch, 8, 16)
        h = self.conv2(h.reshape(h.shape[0], 8, 4, 4))  # (batch, 10, 2, 2)
        return self.out(h.flatten(2).mean(-1))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.relu(nn.Conv(8, (3,), padding=1, name="conv1")(nn.Embed(40, 6, name="embed")(ids)))  # (batch, 16, 8)
        h = nn.Conv(10, (3, 3), strides=2, padding=1, name="conv2")(h.reshape(h.shape[0], 4, 4, 8))
        return nn.Dense(5, name="out")(h.reshape(h.shape[0], -1, 10).mean(1))


def flax_params(net):
    """The Flax twin's params from the PyTorch weights: a ConvNd's (out, in, *window) as (*window, in, out)."""
    w = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    conv = lambda t: jnp.asarray(np.transpose(t, (*range(2, t.ndim), 1, 0)))  # noqa: E731
    return {
        "embed": {"embedding": jnp.asarray(w["embed.weight"])},
        "conv1": {"kernel": conv(w["conv1.weight"]), "bias": jnp.asarray(w["conv1.bias"])},
        "conv2": {"kernel": conv(w["conv2.weight"]), "bias": jnp.asarray(w["conv2.bias"])},
        "out": {"kernel": jnp.asarray(w["out.weight"].T), "bias": jnp.asarray(w["out.bias"])},
    }


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(0)
    net = TorchNet().eval()
    ids = np.random.default_rng(0).integers(0, 40, size=(3, 16))
    params = flax_params(net)
    np.testing.assert_allclose(
        FlaxNet().apply({"params": params}, jnp.asarray(ids)), net(torch.as_tensor(ids)).detach().numpy(), atol=1e-5
    )
    return net, params, ids


def peft_output(net, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(net, str(adapter_dir)).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(ids)).numpy()
    model.unload()  # the twin's torch.nn.Module, unadapted again for the next test
    return out


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_exported_conv_and_embedding_adapters_give_pefts_outputs(twins, tmp_path, method):
    net, params, ids = twins
    cfg = dj.AdapterConfig(method=method, rank=2, alpha=4, targets="embed/embedding|.*/kernel", input_axes=TWIN_AXES)
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    dj.io.export_peft(adapters, cfg, tmp_path, modules=MODULES, params=params)
    ours = dj.inject(FlaxNet().apply, cfg, fallback="error")(params, adapters, jnp.asarray(ids))
    np.testing.assert_allclose(ours, peft_output(net, tmp_path, ids), rtol=1e-5, atol=1e-5)
    again, again_cfg = dj.io.import_peft(tmp_path, params, modules=MODULES)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    assert again_cfg.axes_for("conv2/kernel", (3, 3, 8, 10)) == (0, 1, 2)


def test_pefts_own_conv_and_embedding_adapter_imports_to_its_outputs(twins, tmp_path):
    net, params, ids = twins
    config = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["embed", "conv1", "conv2"], use_dora=True, init_lora_weights=False
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(net, config)
    with torch.no_grad():  # PEFT's magnitudes start at ||W0||: move them too
        for name, value in model.named_parameters():
            if "lora_magnitude_vector" in name:
                value.mul_(1 + 0.2 * torch.rand_like(value))
        expected = model(torch.as_tensor(ids)).numpy()
    model.save_pretrained(tmp_path)
    model.unload()
    adapters, cfg = dj.io.import_peft(tmp_path, params, modules=MODULES)
    assert cfg.method == "dora" and set(cfg.input_axes) == {("conv1/kernel", (0, 1)), ("conv2/kernel", (0, 1, 2))}
    assert adapters["conv2"]["kernel"]["a"].shape == (3, 3, 8, 2)
    ours = dj.inject(FlaxNet().apply, cfg, fallback="error")(params, adapters, jnp.asarray(ids))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_magnitude_only_conv_exports_as_a_zero_rank_one_peft_module(twins, tmp_path):
    net, params, ids = twins
    cfg = dj.AdapterConfig(rank=2, targets="out/kernel", magnitude_targets="conv.*/kernel", input_axes=TWIN_AXES)
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    dj.io.export_peft(adapters, cfg, tmp_path, modules=MODULES, params=params)
    ours = dj.inject(FlaxNet().apply, cfg, fallback="error")(params, adapters, jnp.asarray(ids))
    np.testing.assert_allclose(ours, peft_output(net, tmp_path, ids), rtol=1e-5, atol=1e-5)
    again, again_cfg = dj.io.import_peft(tmp_path, params, modules=MODULES)
    assert set(again["conv2"]["kernel"]) == {"m"} and again_cfg.magnitude_patterns
    jax.tree.map(np.testing.assert_array_equal, again, adapters)


def test_a_modules_mapping_names_its_problems(twins, tmp_path):
    _, params, _ = twins
    cfg = dj.AdapterConfig(rank=2, targets="conv2/kernel", input_axes={"conv2/kernel": (0, 1)})
    adapters = dj.init_adapters(jax.random.key(1), params, cfg)
    with pytest.raises(TargetError, match=r"modules= names \['conv9/kernel'\], no leaves"):
        dj.io.export_peft(adapters, cfg, tmp_path, modules={"conv9/kernel": "conv9"}, params=params)
    with pytest.raises(dj.ConfigError, match=r"modules= maps several leaves to the PyTorch modules \['x'\]"):
        dj.io.export_peft(adapters, cfg, tmp_path, modules={"conv1/kernel": "x", "conv2/kernel": "x"}, params=params)
    with pytest.raises(dj.ConfigError, match="modules= needs params="):
        dj.io.export_peft(adapters, cfg, tmp_path, modules=MODULES)
    with pytest.raises(
        ShapeError, match=r"PEFT's ConvNd adapter contracts the window and input channels, axes \(0, 1, 2\)"
    ):
        dj.io.export_peft(adapters, cfg, tmp_path, modules=MODULES, params=params)
    with pytest.raises(ShapeError, match="is no Linear weight"):
        dj.io.export_peft(adapters, cfg, tmp_path, modules={**MODULES, "conv2/bias": "conv2.bias"}, params=params)
