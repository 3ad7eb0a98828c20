"""Adapters over whole parameter trees: init_adapters and merge.

An adapters tree mirrors the params tree but holds only the targeted kernels; at each one a
dict ``{"a": (*in_shape, r), "b": (r, *out_shape), "m": out_shape}`` ("m" only for DoRA).
For a Flax (d_in, d_out) kernel that is A (d_in, r), B (r, d_out), m (d_out,).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax import targets
from dora_jax.core.config import AdapterConfig
from dora_jax.core.dora import Adapter, column_norm, kernel_layout, merge_kernel
from dora_jax.errors import ShapeError, TargetError

ADAPTER_KEYS = frozenset({"a", "b", "m"})


def is_adapter(node: Any) -> bool:
    """True for the ``{"a", "b"[, "m"]}`` dict that adapts one kernel."""
    return isinstance(node, Mapping) and "a" in node and "b" in node and set(node) <= ADAPTER_KEYS


def adapter_entries(adapters: Any) -> dict[str, Adapter]:
    """The adapters keyed by the '/'-joined path of the kernel each one adapts."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter)
    return {targets.path_str(kp): dict(node) for kp, node in flat if is_adapter(node)}


def init_adapter(rng: jax.Array, kernel: jax.Array, cfg: AdapterConfig, path: str = "kernel") -> Adapter:
    """A and B of one kernel (A random, B zero) and, for DoRA, m = ||W0||_c: W' == W0 at init."""
    if kernel.ndim < 2:
        raise ShapeError(
            f"target {path!r} has shape {tuple(kernel.shape)}: only kernels with at least two axes "
            "can be adapted (does the target pattern end in '/kernel'?)"
        )
    layout = kernel_layout(kernel.shape, cfg.axes_for(path, tuple(kernel.shape)))
    if cfg.rank > min(layout.d_in, layout.d_out):
        raise ShapeError(
            f"AdapterConfig.rank={cfg.rank} exceeds min(d_in, d_out)={min(layout.d_in, layout.d_out)} "
            f"for {path!r} (d_in={layout.d_in}, d_out={layout.d_out})"
        )
    dtype = jnp.dtype(cfg.dtype)
    shapes = layout.adapter_shapes(cfg.rank)
    if cfg.init == "kaiming_uniform":
        # PEFT: kaiming_uniform_(a=sqrt(5)) on the (r, d_in) weight, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / layout.d_in**0.5
        a = jax.random.uniform(rng, shapes["a"], jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(rng, shapes["a"], jnp.float32) / cfg.rank
    adapter = {"a": a.astype(dtype), "b": jnp.zeros(shapes["b"], dtype)}
    if cfg.method == "dora":
        adapter["m"] = column_norm(layout.to_matrix(kernel)).reshape(shapes["m"]).astype(dtype)
    return adapter


def init_adapters(rng: jax.Array, params: Any, cfg: AdapterConfig) -> dict[str, Any]:
    """Adapters for every leaf of ``params`` that ``cfg.targets`` selects.

    Each target's key is derived from ``rng`` and its path, so adding a target leaves the
    initial values of the others unchanged.
    """
    selected = targets.select(params, cfg.target_patterns)
    flat = {
        path: init_adapter(jax.random.fold_in(rng, zlib.crc32(path.encode())), kernel, cfg, path)
        for path, kernel in selected.items()
    }
    return targets.nest(flat)


def check_adapter(path: str, kernel: jax.Array, adapter: Adapter, cfg: AdapterConfig) -> None:
    """Raises ShapeError when ``adapter`` does not fit ``kernel`` under ``cfg``."""
    layout = kernel_layout(kernel.shape, cfg.axes_for(path, tuple(kernel.shape)))
    rank = adapter["a"].shape[-1]
    expected = layout.adapter_shapes(rank)
    if cfg.method == "lora":
        expected.pop("m")
    elif "m" not in adapter:
        raise ShapeError(f"adapter for {path!r} has no magnitude 'm', which method='dora' needs")
    for key, shape in expected.items():
        if tuple(adapter[key].shape) != shape:
            raise ShapeError(
                f"adapter {path}/{key} has shape {tuple(adapter[key].shape)}; the kernel of shape "
                f"{tuple(kernel.shape)} with rank {rank} needs {shape}"
            )


def matched_entries(params: Any, adapters: Any, cfg: AdapterConfig) -> dict[str, Adapter]:
    """``adapter_entries(adapters)`` after checking each names a leaf of ``params`` and fits it."""
    entries = adapter_entries(adapters)
    leaves = targets.leaves_by_path(params)
    missing = sorted(set(entries) - set(leaves))
    if missing:
        raise TargetError(
            f"adapters for {missing} name no leaf of the parameter tree. Available leaves:\n{targets.describe(params)}"
        )
    for path, adapter in entries.items():
        check_adapter(path, leaves[path], adapter, cfg)
    return entries


def merge(params: Any, adapters: Any, cfg: AdapterConfig) -> Any:
    """``params`` with every adapted kernel replaced by W' (same structure and dtypes).

    The result is a plain model again: zero inference overhead, and the form in which DoRA
    models reach servers that do not load adapters.
    """
    entries = matched_entries(params, adapters, cfg)

    def replace(keypath: Any, leaf: jax.Array) -> jax.Array:
        path = targets.path_str(keypath)
        if path not in entries:
            return leaf
        return merge_kernel(leaf, entries[path], cfg, cfg.axes_for(path, tuple(leaf.shape)))

    return jax.tree_util.tree_map_with_path(replace, params)
