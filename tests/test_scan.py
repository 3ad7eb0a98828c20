"""Scanned decoder layers (``model.scan_layers``): one ``nn.scan`` over stacked layers equals the
unrolled model in outputs, adapter gradients, decoding, HF and PEFT files, and shards its layer axis."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import TINY_LLAMA, perturb
from dora_jax import generate, io, models, parallel
from dora_jax.errors import ShapeError

HF = dict(TINY_LLAMA, model_type="llama")  # 2 layers
TARGETS = r".*/(q_proj|v_proj|o_proj|down_proj)/kernel"


@pytest.fixture(scope="module")
def pair():
    """(unrolled, scanned) modules of the same 2-layer Llama, params of each (the same weights), ids."""
    unrolled = models.from_hf_config(HF)
    scanned = models.from_hf_config(HF, scan_layers=True)
    params = jax.jit(models.init_params, static_argnums=0)(unrolled, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, HF["vocab_size"], size=(2, 9)))
    return unrolled, scanned, params, models.stack_layers(params), ids


def test_stacking_round_trips_and_matches_the_scanned_models_own_layout(pair):
    unrolled, scanned, params, stacked, _ = pair
    shapes = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), stacked)
    assert shapes == jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), models.abstract_params(scanned))
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    chex_equal = jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked), params)
    assert chex_equal is not None
    assert models.unstack_layers(params) is params and models.stack_layers(stacked) is stacked


def test_stacking_layers_of_different_structure_is_a_shape_error():
    tree = {"layers_0": {"w": np.zeros(2)}, "layers_1": {"v": np.zeros(2)}}
    with pytest.raises(ShapeError, match="differ in structure"):
        models.stack_layers(tree)
    with pytest.raises(ShapeError, match="layers_0 ... layers_1; got indices \\[0, 2\\]"):
        models.stack_layers({"layers_0": 1, "layers_2": 2})


def test_scanned_layers_carry_the_layers_logical_axis(pair):
    _, scanned, *_ = pair
    spec = models.logical_axes(scanned)["layers"]
    assert tuple(spec["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(spec["input_layernorm"]["scale"]) == ("layers", "norm")


def test_scanned_forward_equals_the_unrolled_one(pair):
    unrolled, scanned, params, stacked, ids = pair
    expected = jax.jit(unrolled.apply)({"params": params}, ids)
    np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, ids), expected, atol=1e-5, rtol=1e-5)
    remat = models.from_hf_config(HF, scan_layers=True, remat="full")
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": stacked}, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        dict(method="dora", targets=r".*/(q_proj|v_proj|down_proj)/kernel", magnitude_targets=r".*/o_proj/kernel"),
        dict(method="dora", forward="folded", norm_grad="exact"),
        dict(method="vera", rank=8),
    ],
    ids=["dora-and-magnitude-only", "dora-folded", "vera"],
)
def test_adapted_scan_equals_the_unrolled_model_in_outputs_and_adapter_gradients(pair, fields):
    unrolled, scanned, params, stacked, ids = pair
    cfg = dj.AdapterConfig(**{"rank": 4, "targets": TARGETS, **fields})
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg), scale=0.05)
    stacked_adapters = models.stack_layers(adapters)
    assert dj.merged_targets(scanned.apply, cfg, stacked, stacked_adapters, ids) == {}

    def loss(apply, params, adapters):
        return jnp.mean(jnp.square(dj.inject(apply, cfg, fallback="error")(params, adapters, ids)))

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=2), static_argnums=0)(unrolled.apply, params, adapters)
    scan_value, scan_grads = jax.jit(jax.value_and_grad(loss, argnums=2), static_argnums=0)(
        scanned.apply, stacked, stacked_adapters
    )
    np.testing.assert_allclose(scan_value, value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(models.unstack_layers(scan_grads)), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6 * float(jnp.abs(want).max()) + 1e-9, rtol=1e-4)


def test_adapters_made_on_the_stacked_params_by_stacked_axes_run_through_inject_like_merge(pair):
    # dj.init_adapters over the scanned model's own params (AdapterConfig.stacked_axes: the layers axis leads):
    # nn.scan hands each layer its slice, routed (fallback="error"); the whole-stack merge gives the same logits
    _, scanned, _, stacked, ids = pair
    cfg = dj.AdapterConfig(rank=2, targets=TARGETS, stacked_axes={"layers/.*": 1}, fallback="error")
    adapters = perturb(dj.init_adapters(jax.random.key(1), stacked, cfg))
    assert adapters["layers"]["self_attn"]["q_proj"]["kernel"]["a"].shape == (2, 64, 2)
    got = jax.jit(dj.inject(scanned.apply, cfg))(stacked, adapters, ids)
    want = scanned.apply({"params": dj.merge(stacked, adapters, cfg)}, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_each_scanned_layer_draws_its_own_dropout_mask(pair, monkeypatch):
    _, scanned, params, stacked, ids = pair
    cfg = dj.AdapterConfig(rank=4, targets=r".*/q_proj/kernel", dropout=0.5)
    adapters = models.stack_layers(dj.init_adapters(jax.random.key(1), params, cfg))
    keys = []
    inject = importlib.import_module("dora_jax.inject")  # the module (dora_jax.inject is the function)
    original = inject._Adapted.__init__

    def record(self, matrices, cfg, dropout_rng):
        if dropout_rng is not None:  # None in the abstract trace that finds the routable targets
            data = jax.random.key_data(dropout_rng)
            jax.debug.callback(lambda data: keys.append(tuple(np.asarray(data).ravel())), data)
        original(self, matrices, cfg, dropout_rng)

    monkeypatch.setattr(inject._Adapted, "__init__", record)
    jax.block_until_ready(dj.inject(scanned.apply, cfg)(stacked, adapters, ids, dropout_rng=jax.random.key(2)))
    assert len(keys) == 2 and len(set(keys)) == 2


def test_beam_search_on_the_scanned_models_cache_gives_the_unrolled_models_beams(pair):
    unrolled, scanned, params, stacked, ids = pair
    params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)  # sharper logits: varied tokens
    mask = jnp.ones_like(ids).at[1, :2].set(0)

    def forward(model):
        return lambda params, ids, **kw: model.apply({"params": params}, ids, **kw)

    # beam search reorders the cache's first axis every step: the stacked cache keeps the batch first
    beams, scores = generate.beam_search(
        forward(scanned), models.stack_layers(params), scanned.config, ids, mask, max_new_tokens=4, num_beams=2
    )
    want, want_scores = generate.beam_search(
        forward(unrolled), params, unrolled.config, ids, mask, max_new_tokens=4, num_beams=2
    )
    np.testing.assert_array_equal(beams, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_hf_files_are_the_same_from_either_layout(pair, tmp_path):
    unrolled, scanned, params, stacked, _ = pair
    io.save_hf(scanned, stacked, tmp_path / "from_scan")
    model, loaded = io.load_hf(tmp_path / "from_scan")
    assert not models.scans_layers(model)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    model, loaded = io.load_hf(tmp_path / "from_scan", scan_layers=True)
    assert models.scans_layers(model)
    jax.tree.map(np.testing.assert_array_equal, loaded, stacked)


def test_peft_adapters_are_the_same_from_either_layout(pair, tmp_path):
    unrolled, scanned, params, stacked, _ = pair
    cfg = dj.AdapterConfig(rank=4, targets=TARGETS)
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    io.export_peft(adapters, cfg, tmp_path / "unrolled", model=unrolled)
    io.export_peft(models.stack_layers(adapters), cfg, tmp_path / "scanned", model=scanned)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unrolled" / name).read_bytes()
    imported, imported_cfg = io.import_peft(tmp_path / "scanned", models.abstract_params(scanned), model=scanned)
    assert imported_cfg.targets == cfg.targets or imported_cfg.target_patterns
    jax.tree.map(np.testing.assert_array_equal, imported, models.stack_layers(adapters))


def test_stacked_adapters_shard_like_their_kernels_with_the_layer_axis_replicated(pair):
    _, scanned, params, _, _ = pair
    mesh = jax.sharding.AbstractMesh((1, 2, 4), parallel.AXES)  # shapes only: no devices needed
    cfg = dj.AdapterConfig(rank=4, targets=TARGETS)
    adapters = models.stack_layers(dj.init_adapters(jax.random.key(1), params, cfg))
    shardings = parallel.adapter_shardings(adapters, models.logical_axes(scanned), mesh, parallel.DEFAULT_RULES)
    down, q = shardings["layers"]["mlp"]["down_proj"]["kernel"], shardings["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(down["a"].spec) == (None, "tensor", None)  # (layers, mlp, r)
    assert tuple(down["b"].spec) == (None, None, "fsdp") and tuple(down["m"].spec) == (None, "fsdp")
    assert tuple(q["a"].spec) == (None, "fsdp", None) and tuple(q["b"].spec) == (None, None, "tensor")


def test_a_seed_gives_the_scanned_model_the_unrolled_models_weights(pair):
    unrolled, scanned, *_ = pair
    want = models.stack_layers(models.init_params(unrolled, jax.random.key(5)))
    jax.tree.map(np.testing.assert_array_equal, models.init_params(scanned, jax.random.key(5)), want)
