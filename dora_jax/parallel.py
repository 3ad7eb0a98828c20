"""Device mesh, logical-axis rules and the shardings of params, adapters, optimizer state and batches.

The mesh has three named axes: ``data`` (batch), ``fsdp`` (batch, and parameters split along
their ``embed`` axis) and ``tensor`` (parameters split along heads / mlp / vocab). Model
parameters carry logical axis names (``dj.models.logical_axes``); rules map them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dora_jax.core import is_adapter, quantize
from dora_jax.errors import ConfigError
from dora_jax.models.stacking import LAYERS
from dora_jax.targets import path_str

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    (LAYERS, None),  # the stacked layer axis of a scanned model: every device holds every layer's slice
)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

    A mesh smaller than the device count must divide it and uses the first devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ConfigError(f"mesh axes {unknown} are unknown; axes: {list(AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in AXES]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh sizes {dict(zip(AXES, shape, strict=True))}: each must be positive, one may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(AXES, shape, strict=True))} do not divide the {len(devices)} devices"
            )
        shape[shape.index(-1)] = len(devices) // known
    size = math.prod(shape)
    if len(devices) % size:
        raise ConfigError(
            f"mesh {dict(zip(AXES, shape, strict=True))} has {size} devices, which does not divide the "
            f"{len(devices)} devices available"
        )
    if size < len(devices):
        log.warning("mesh uses %d of %d devices", size, len(devices))
    return Mesh(np.array(devices[:size]).reshape(shape), AXES)


def rules_from(config_rules: Any) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules from a config (a sequence of (logical, mesh axis or axes or None) pairs)."""
    if not config_rules:
        return DEFAULT_RULES
    return tuple((str(name), tuple(axis) if isinstance(axis, list) else axis) for name, axis in config_rules)


def _spec(logical: PartitionSpec, rules: Sequence[tuple[str, Any]], mesh: Mesh, shape: Sequence[int]) -> PartitionSpec:
    """Mesh PartitionSpec of one array; an axis stays unsplit when its size does not divide evenly."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        parts = math.prod(mesh.shape[name] for name in names)
        out.append(axes if parts > 1 and dim % parts == 0 else None)
    return PartitionSpec(*out)


def param_shardings(logical_specs: Any, abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedSharding for every parameter from its logical spec (a quantized kernel: its codes and scales)."""

    def one(spec: PartitionSpec, leaf: Any) -> Any:
        if quantize.is_quantized(leaf):
            return _quantized_sharding(spec, leaf, mesh, rules)
        return NamedSharding(mesh, _spec(spec, rules, mesh, leaf.shape))

    return jax.tree.map(one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _quantized_sharding(logical: PartitionSpec, kernel: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """A quantized 2-axis kernel's codes shard as the kernel; its scales (one per block of inputs and
    output column) along the same axes. The input axis splits only where every shard holds whole
    blocks (d_in / shards a multiple of the block size), so that no block straddles two devices; kernels
    of more axes stay replicated."""
    codes, scales = kernel.values.qvalue, kernel.values.scale
    if kernel.ndim != 2:
        code_spec = scale_spec = PartitionSpec()
    else:
        code_spec, scale_spec = _spec(logical, rules, mesh, codes.shape), _spec(logical, rules, mesh, scales.shape)
        inputs = codes.ndim - 2  # after a stacked model's leading layers axis
        if kernel.block_size and scale_spec[inputs] is None:  # the blocks do not divide over the input's shards
            code_spec = PartitionSpec(*code_spec[:inputs], None, *code_spec[inputs + 1 :])
    values = dataclasses.replace(
        kernel.values, qvalue=NamedSharding(mesh, code_spec), scale=NamedSharding(mesh, scale_spec)
    )
    return dataclasses.replace(kernel, values=values)


def adapter_shardings(adapters: Any, logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """A (d_in, r) follows its kernel's input axis, B (r, d_out), m (d_out,) and VeRA's lambda_b its
    output axis; VeRA's lambda_d and shared projections are replicated; a stacked kernel's leading
    ``layers`` axis leads its adapters too.

    Kernels with more than two axes keep their adapters replicated.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    specs = {path_str(kp): tuple(spec) for kp, spec in flat}

    def one(keypath: Any, adapter: Any) -> Any:
        if not is_adapter(adapter):  # VeRA's shared projections: small, read by every layer
            return NamedSharding(mesh, PartitionSpec())
        logical = specs.get(path_str(keypath), ())
        stacked = logical[:1] if logical[:1] == (LAYERS,) else ()  # a scanned model's layer axis leads
        logical = logical[len(stacked) :]
        logical_in, logical_out = logical if len(logical) == 2 else (None, None)
        wanted = {"a": (logical_in, None), "b": (None, logical_out), "m": (logical_out,)}
        wanted.update(lambda_d=(None,), lambda_b=(logical_out,))
        return {
            key: NamedSharding(mesh, _spec(PartitionSpec(*stacked, *wanted[key]), rules, mesh, value.shape))
            for key, value in adapter.items()
        }

    return jax.tree_util.tree_map_with_path(one, adapters, is_leaf=is_adapter)


def under_mesh(fn: Any, mesh: Mesh) -> Any:
    """``fn`` traced with ``mesh`` as the abstract mesh (``jax.sharding.use_abstract_mesh``), for a jitted
    step: a Pallas kernel that runs per shard reads it (``models.splash``); the rest of the step ignores it."""
    if mesh.size == 1:
        return fn

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first axis over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    """The global batch must split evenly over the batch axes and the hosts."""
    parts = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % parts:
        raise ConfigError(
            f"{what}={global_batch} is not divisible by the batch axes data x fsdp = "
            f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {parts}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(f"{what}={global_batch} is not divisible by the {jax.process_count()} hosts")
