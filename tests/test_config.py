"""AdapterConfig validation and the errors for targets and shapes that do not fit."""

import math

import jax
import jax.numpy as jnp
import pytest

import dora_jax as dj
from dora_jax.core import AdapterConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", "dorra", "AdapterConfig.method: expected one of 'dora', 'lora', 'vera', 'dvora'; got 'dorra'"),
        ("rank", 0, "AdapterConfig.rank: expected a positive integer; got 0"),
        ("rank", -4, "AdapterConfig.rank: expected a positive integer; got -4"),
        ("rank", 2.5, "AdapterConfig.rank: expected a positive integer; got 2.5"),
        ("alpha", 0, "AdapterConfig.alpha: expected a positive finite number; got 0"),
        ("alpha", math.inf, "AdapterConfig.alpha: expected a positive finite number; got inf"),
        ("dropout", 1.0, "AdapterConfig.dropout: expected a rate in [0, 1); got 1.0"),
        ("norm_grad", "stop", "AdapterConfig.norm_grad: expected one of 'exact', 'detach'; got 'stop'"),
        ("init", "zeros", "AdapterConfig.init: expected one of 'kaiming_uniform', 'gaussian'; got 'zeros'"),
        ("dtype", "int8", "AdapterConfig.dtype: expected a floating dtype such as 'float32' or 'bfloat16'; got 'int8'"),
        ("rslora", "yes", "AdapterConfig.rslora: expected True or False; got 'yes'"),
        ("targets", "(query", "AdapterConfig.targets: '(query' is not a valid regex"),
        ("targets", (), "AdapterConfig.targets: expected at least one regex; got an empty sequence"),
        ("input_axes", {"x": (0, 0)}, "AdapterConfig.input_axes['x']: expected distinct integer axes; got (0, 0)"),
    ],
)
def test_invalid_field_names_field_and_choices(field, value, message):
    kwargs = {"targets": ".*/kernel", field: value}
    with pytest.raises(dj.ConfigError) as err:
        AdapterConfig(**kwargs)
    assert message in str(err.value)


def test_scale_is_alpha_over_rank_or_its_square_root_for_rslora():
    assert AdapterConfig(rank=16, alpha=32, targets="k").scale == 2.0
    assert AdapterConfig(rank=16, alpha=32, targets="k", rslora=True).scale == 8.0


def test_config_is_hashable_and_round_trips_through_a_dict():
    cfg = AdapterConfig(rank=4, targets=("a/kernel", "b/kernel"), input_axes={"o/kernel": (0, 1)}, dtype=jnp.bfloat16)
    assert hash(cfg) == hash(AdapterConfig.from_dict(cfg.to_dict()))
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.dtype == "bfloat16"


def test_unknown_dict_key_lists_the_valid_fields():
    with pytest.raises(dj.ConfigError, match=r"unknown field\(s\) \['rnak'\]; valid fields: \['method', 'rank'"):
        AdapterConfig.from_dict({"rnak": 8, "targets": "k"})


def test_pattern_matching_no_leaf_lists_available_paths(mlp):
    _, params, _ = mlp
    cfg = AdapterConfig(targets=(".*/kernel", ".*/query/kernel"))
    with pytest.raises(dj.TargetError) as err:
        dj.init_adapters(jax.random.key(0), params, cfg)
    text = str(err.value)
    assert "target pattern '.*/query/kernel' matches no leaf" in text
    assert "  up/kernel (16, 32)" in text and "  down/bias (12,)" in text


def test_available_paths_group_numbered_layers():
    params = {f"layer_{i}": {"dense": {"kernel": jnp.zeros((4, 4))}} for i in range(12)}
    with pytest.raises(dj.TargetError, match=r"layer_\*/dense/kernel \(x12\) \(4, 4\)"):
        dj.init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, targets="nothing"))


def test_rank_larger_than_kernel_is_rejected(mlp):
    _, params, _ = mlp
    cfg = AdapterConfig(rank=13, targets="down/kernel")
    with pytest.raises(
        dj.ShapeError, match=r"rank=13 exceeds min\(d_in, d_out\)=12 for 'down/kernel' \(d_in=32, d_out=12\)"
    ):
        dj.init_adapters(jax.random.key(0), params, cfg)


def test_targeting_a_bias_is_rejected(mlp):
    _, params, _ = mlp
    with pytest.raises(dj.ShapeError, match=r"target 'up/bias' has shape \(32,\): only kernels with at least two axes"):
        dj.init_adapters(jax.random.key(0), params, AdapterConfig(rank=2, targets="up/.*"))


def test_kernel_with_three_axes_needs_input_axes(block):
    _, params, _ = block
    cfg = AdapterConfig(rank=2, targets=".*/query/kernel")
    with pytest.raises(
        dj.ShapeError, match=r"kernel 'attention/query/kernel' has shape \(32, 4, 8\) \(3 axes\): say which"
    ):
        dj.init_adapters(jax.random.key(0), params, cfg)


def test_input_axes_out_of_range_are_rejected(block):
    _, params, _ = block
    cfg = AdapterConfig(rank=2, targets=".*/query/kernel", input_axes={".*": (3,)})
    with pytest.raises(
        dj.ShapeError,
        match=r"input_axes \(3,\) for 'attention/query/kernel' do not fit its kernel of shape \(32, 4, 8\)",
    ):
        dj.init_adapters(jax.random.key(0), params, cfg)


def test_merge_rejects_adapter_for_missing_leaf(mlp):
    _, params, _ = mlp
    cfg = AdapterConfig(rank=2, targets="up/kernel")
    adapters = {"upp": dj.init_adapters(jax.random.key(0), params, cfg)["up"]}
    with pytest.raises(dj.TargetError, match=r"adapters for \['upp/kernel'\] name no leaf"):
        dj.merge(params, adapters, cfg)


def test_merge_rejects_adapter_of_wrong_shape(mlp):
    _, params, _ = mlp
    cfg = AdapterConfig(rank=2, targets="up/kernel")
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    adapters["up"]["kernel"]["b"] = jnp.zeros((2, 31))
    with pytest.raises(
        dj.ShapeError,
        match=r"adapter up/kernel/b has shape \(2, 31\); the kernel of shape \(16, 32\) with rank 2 needs \(2, 32\)",
    ):
        dj.merge(params, adapters, cfg)


def test_dora_merge_needs_a_magnitude(mlp):
    _, params, _ = mlp
    lora = dj.init_adapters(jax.random.key(0), params, AdapterConfig(method="lora", rank=2, targets="up/kernel"))
    with pytest.raises(dj.ShapeError, match=r"adapter for 'up/kernel' has no magnitude 'm'"):
        dj.merge(params, lora, AdapterConfig(method="dora", rank=2, targets="up/kernel"))
