"""Adapters over whole parameter trees: init_adapters and merge.

An adapters tree mirrors the params tree but holds only the targeted kernels; at each one a
dict ``{"a": (*in_shape, r), "b": (r, *out_shape), "m": out_shape}`` ("m" only for DoRA).
For a Flax (d_in, d_out) kernel that is A (d_in, r), B (r, d_out), m (d_out,). A magnitude
target (``AdapterConfig.magnitude_targets``) holds ``{"m": out_shape}`` alone. VeRA and DVoRA
targets hold ``{"lambda_d": (r,), "lambda_b": out_shape[, "m"]}``, and the tree holds the shared
projections once, under ``core.vera.PROJECTION``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax import targets
from dora_jax.core import quantize, vera
from dora_jax.core.config import AdapterConfig
from dora_jax.core.dora import Adapter, KernelLayout, column_norm, kernel_layout, merge_kernel
from dora_jax.errors import ConfigError, ShapeError, TargetError

ADAPTER_KEYS = frozenset({"a", "b", "m", "lambda_d", "lambda_b"})


def is_adapter(node: Any) -> bool:
    """True for the dict that adapts one kernel: ``{"a", "b"[, "m"]}``, ``{"lambda_d", "lambda_b"[, "m"]}``
    (VeRA, DVoRA) or ``{"m"}`` (magnitude only)."""
    if not isinstance(node, Mapping) or not set(node) <= ADAPTER_KEYS:
        return False
    leaves = not any(isinstance(value, Mapping) for value in node.values())  # not a module that happens to be named "m"
    return leaves and set(node) - {"m"} in ({"a", "b"}, {"lambda_d", "lambda_b"}, set()) and bool(node)


def adapter_entries(adapters: Any) -> dict[str, Adapter]:
    """The adapters keyed by the '/'-joined path of the kernel each one adapts."""
    flat, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter)
    return {targets.path_str(kp): dict(node) for kp, node in flat if is_adapter(node)}


def init_adapter(rng: jax.Array, kernel: jax.Array, cfg: AdapterConfig, path: str = "kernel") -> Adapter:
    """A and B of one kernel (A random, B zero; an nn.Embed table, as PEFT: A zero, B standard normal)
    and, for DoRA, m = ||W0||_c: W' == W0 at init."""
    layout = _layout(kernel, cfg, path)
    dtype = jnp.dtype(cfg.dtype)
    if cfg.vector_based:  # the rank of shared random projections may exceed a layer's dimensions
        return _with_magnitude(vera.init_vectors(cfg.rank, layout.out_shape, cfg.d_initial, dtype), kernel, layout, cfg)
    if cfg.rank > min(layout.d_in, layout.d_out):
        raise ShapeError(
            f"AdapterConfig.rank={cfg.rank} exceeds min(d_in, d_out)={min(layout.d_in, layout.d_out)} "
            f"for {path!r} (d_in={layout.d_in}, d_out={layout.d_out})"
        )
    shapes = layout.adapter_shapes(cfg.rank)
    if path.rpartition("/")[2] == "embedding":  # nn.Embed's table; PEFT starts A at zero and B normal
        return _with_magnitude(
            {"a": jnp.zeros(shapes["a"], dtype), "b": jax.random.normal(rng, shapes["b"], jnp.float32).astype(dtype)},
            kernel,
            layout,
            cfg,
        )
    if cfg.init == "kaiming_uniform":
        # PEFT: kaiming_uniform_(a=sqrt(5)) on the (r, d_in) weight, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / layout.d_in**0.5
        a = jax.random.uniform(rng, shapes["a"], jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(rng, shapes["a"], jnp.float32) / cfg.rank
    return _with_magnitude({"a": a.astype(dtype), "b": jnp.zeros(shapes["b"], dtype)}, kernel, layout, cfg)


def _layout(kernel: jax.Array, cfg: AdapterConfig, path: str) -> KernelLayout:
    """The matrix view of a target's kernel; a leaf with fewer than two axes is a ShapeError naming it."""
    if kernel.ndim < 2:
        raise ShapeError(
            f"target {path!r} has shape {tuple(kernel.shape)}: only kernels with at least two axes "
            "can be adapted (does the target pattern end in '/kernel'?)"
        )
    return kernel_layout(kernel.shape, cfg.axes_for(path, tuple(kernel.shape)))


def _magnitude(kernel: jax.Array, layout: KernelLayout, cfg: AdapterConfig) -> jax.Array:
    """m = ||W0||_c in the adapter dtype, shaped as the kernel's output axes (a quantized W0: of its
    dequantized values, as PEFT over bitsandbytes layers)."""
    norms = column_norm(layout.to_matrix(quantize.dequantized(kernel)))
    return norms.reshape(layout.out_shape).astype(jnp.dtype(cfg.dtype))


def _with_magnitude(adapter: Adapter, kernel: jax.Array, layout: KernelLayout, cfg: AdapterConfig) -> Adapter:
    """``adapter`` with DoRA's m = ||W0||_c added (LoRA: unchanged)."""
    if cfg.decomposed:
        adapter["m"] = _magnitude(kernel, layout, cfg)
    return adapter


def init_magnitude(kernel: jax.Array, cfg: AdapterConfig, path: str = "kernel") -> Adapter:
    """The adapter of a magnitude-only module: ``{"m": ||W0||_c}``, so W' == W0 at init."""
    return {"m": _magnitude(kernel, _layout(kernel, cfg, path), cfg)}


def init_adapters(rng: jax.Array, params: Any, cfg: AdapterConfig) -> dict[str, Any]:
    """Adapters for every leaf of ``params`` that ``cfg.targets`` selects, and a magnitude for each
    leaf ``cfg.magnitude_targets`` selects (a leaf both select is a ConfigError naming it).

    Each target's key is derived from ``rng`` and its path, so adding a target leaves the
    initial values of the others unchanged.
    """
    selected = targets.select(params, cfg.target_patterns)
    magnitudes = targets.select(params, cfg.magnitude_patterns) if cfg.magnitude_patterns else {}
    both = [path for path in magnitudes if path in selected]
    if both:
        raise ConfigError(
            f"AdapterConfig: {both} match both targets and magnitude_targets; a magnitude-only module "
            "trains no A and B, so the two sets must be disjoint"
        )

    def init(path: str, kernel: Any) -> Adapter:
        stacked = cfg.stacked_for(path)
        if path in selected:
            keys = _layer_keys(jax.random.fold_in(rng, zlib.crc32(path.encode())), kernel.shape[:stacked])
            return per_layer(lambda key, kernel: init_adapter(key, kernel, cfg, path), stacked)(keys, kernel)
        return per_layer(lambda kernel: init_magnitude(kernel, cfg, path), stacked)(kernel)

    flat = {
        path: init(path, kernel)
        for path, kernel in targets.leaves_by_path(params).items()
        if path in selected or path in magnitudes
    }
    adapters = targets.nest(flat)
    if cfg.vector_based:
        if vera.PROJECTION in adapters:
            raise ConfigError(f"a target's path starts with {vera.PROJECTION!r}, the key VeRA keeps its projections at")
        layouts = [kernel_layout(k.shape, cfg.axes_for(p, tuple(k.shape))) for p, k in selected.items()]
        shapes = [(layout.d_in, layout.d_out) for layout in layouts]
        adapters[vera.PROJECTION] = vera.init_projection(cfg.projection_seed, cfg.rank, shapes, jnp.dtype(cfg.dtype))
    return adapters


def per_layer(fn: Any, stacked: int) -> Any:
    """``fn`` mapped over ``stacked`` leading axes of all its arguments (a stack of layers,
    ``AdapterConfig.stacked_axes``): each layer's kernel gets its own adapter; ``fn`` itself for 0."""
    for _ in range(stacked):
        fn = jax.vmap(fn)
    return fn


def merge_layers(
    kernel: jax.Array, adapter: Adapter, cfg: AdapterConfig, axes: tuple[int, ...], projection: Any, stacked: int
) -> jax.Array:
    """``merge_kernel`` of each layer of a kernel stacked along ``stacked`` leading axes (``axes``: one
    layer's input axes); ``merge_kernel`` itself for 0."""
    return per_layer(lambda w, a: merge_kernel(w, a, cfg, axes, projection), stacked)(kernel, adapter)


def _layer_keys(key: jax.Array, stack: tuple[int, ...]) -> jax.Array:
    """One key per layer of a stack of shape ``stack`` (``key`` itself for none)."""
    if not stack:
        return key
    keys = jax.random.split(key, math.prod(stack))
    return keys.reshape(*stack, *keys.shape[1:])


def check_adapter(path: str, kernel: jax.Array, adapter: Adapter, cfg: AdapterConfig) -> None:
    """Raises ShapeError when ``adapter`` does not fit ``kernel`` under ``cfg`` (a stacked kernel: its
    adapter stacked alike, each layer's adapter fitting the layer's kernel)."""
    stacked = cfg.stacked_for(path)
    if stacked:
        stack = tuple(kernel.shape[:stacked])
        if len(kernel.shape) < stacked + 2:
            raise ShapeError(
                f"stacked_axes gives {path!r} {stacked} leading layer axes; its kernel of shape {tuple(kernel.shape)} "
                "then has fewer than two axes per layer"
            )
        for key, value in adapter.items():
            if tuple(value.shape[:stacked]) != stack:
                raise ShapeError(
                    f"adapter {path}/{key} has shape {tuple(value.shape)}; the kernel's {stacked} stacked axes need "
                    f"it to start with {stack}"
                )
        kernel = jax.ShapeDtypeStruct(tuple(kernel.shape[stacked:]), jnp.float32)
        adapter = {key: jax.ShapeDtypeStruct(tuple(v.shape[stacked:]), v.dtype) for key, v in adapter.items()}
    layout = kernel_layout(kernel.shape, cfg.axes_for(path, tuple(kernel.shape)))
    if "lambda_d" in adapter:
        _check_vectors(path, kernel, adapter, cfg, layout)
        return
    if "a" not in adapter:  # magnitude only
        if cfg.method != "dora":
            raise ShapeError(f"adapter for {path!r} holds a magnitude alone, which only method='dora' can use")
        if tuple(adapter["m"].shape) != layout.out_shape:
            raise ShapeError(
                f"adapter {path}/m has shape {tuple(adapter['m'].shape)}; the kernel of shape "
                f"{tuple(kernel.shape)} needs {layout.out_shape}"
            )
        return
    if cfg.vector_based:
        raise ShapeError(f"adapter for {path!r} holds A and B; method={cfg.method!r} trains lambda_d and lambda_b")
    rank = adapter["a"].shape[-1]
    expected = layout.adapter_shapes(rank)
    if not cfg.decomposed:
        expected.pop("m")
    elif "m" not in adapter:
        raise ShapeError(f"adapter for {path!r} has no magnitude 'm', which method='dora' needs")
    for key, shape in expected.items():
        if tuple(adapter[key].shape) != shape:
            raise ShapeError(
                f"adapter {path}/{key} has shape {tuple(adapter[key].shape)}; the kernel of shape "
                f"{tuple(kernel.shape)} with rank {rank} needs {shape}"
            )


def _check_vectors(path: str, kernel: jax.Array, adapter: Adapter, cfg: AdapterConfig, layout: Any) -> None:
    if not cfg.vector_based:
        raise ShapeError(f"adapter for {path!r} holds VeRA's lambda_d, lambda_b; method={cfg.method!r} uses A, B")
    expected = {"lambda_d": (cfg.rank,), "lambda_b": layout.out_shape}
    if cfg.decomposed:
        expected["m"] = layout.out_shape
    for key, shape in expected.items():
        if key not in adapter:
            raise ShapeError(f"adapter for {path!r} has no {key!r}, which method={cfg.method!r} needs")
        if tuple(adapter[key].shape) != shape:
            raise ShapeError(
                f"adapter {path}/{key} has shape {tuple(adapter[key].shape)}; the kernel of shape "
                f"{tuple(kernel.shape)} with rank {cfg.rank} needs {shape}"
            )


def check_projection(path: str, kernel: jax.Array, projection: Adapter | None, cfg: AdapterConfig) -> None:
    """Raises ShapeError unless VeRA's shared projections exist and cover the kernel at ``path``:
    (>= d_in, r) and (r, >= d_out)."""
    if projection is None or set(projection) != set(vera.PROJECTION_KEYS):
        raise ShapeError(
            f"method={cfg.method!r} needs the shared projections at adapters[{vera.PROJECTION!r}] "
            f"with keys {list(vera.PROJECTION_KEYS)} (dj.init_adapters makes them)"
        )
    shared_a, shared_b = (projection[k].shape for k in vera.PROJECTION_KEYS)
    layout = kernel_layout(kernel.shape, cfg.axes_for(path, tuple(kernel.shape)))
    covered = shared_a[0] >= layout.d_in and shared_b[1] >= layout.d_out
    if not covered or cfg.rank != shared_a[1] or cfg.rank != shared_b[0]:
        raise ShapeError(
            f"the shared projections {shared_a} and {shared_b} do not cover {path!r} (d_in={layout.d_in}, "
            f"d_out={layout.d_out}, r={cfg.rank}): they need at least ({layout.d_in}, {cfg.rank}) and "
            f"({cfg.rank}, {layout.d_out})"
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
    if cfg.vector_based:
        projection = vera.projection_of(adapters)
        for path in (p for p, adapter in entries.items() if "lambda_d" in adapter):
            check_projection(path, leaves[path], projection, cfg)
    return entries


def merge(params: Any, adapters: Any, cfg: AdapterConfig) -> Any:
    """``params`` with every adapted kernel replaced by W' (same structure and dtypes).

    The result is a plain model again: zero inference overhead, and the form in which DoRA
    models reach servers that do not load adapters.
    """
    entries = matched_entries(params, adapters, cfg)
    projection = vera.projection_of(adapters)

    def replace(keypath: Any, leaf: jax.Array) -> jax.Array:
        path = targets.path_str(keypath)
        if path not in entries:
            return leaf
        kernel = quantize.dequantized(leaf)  # W' of a quantized W0 is built from its dequantized values
        stacked = cfg.stacked_for(path)
        axes = cfg.axes_for(path, tuple(leaf.shape[stacked:]))
        return merge_layers(kernel, entries[path], cfg, axes, projection, stacked)

    return jax.tree_util.tree_map_with_path(replace, params, is_leaf=targets.is_parameter_node)
