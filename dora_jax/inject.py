"""Run any Flax linen ``apply`` with adapters, routing targeted layers through the factored forward.

``inject(model.apply, cfg)(params, adapters, *args, **kwargs)`` equals
``model.apply({"params": merge(params, adapters, cfg)}, *args, **kwargs)``, but every targeted
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call is intercepted
(``nn.intercept_methods``) and computed as ``(m/n)(x @ W0 + s drop(x) @ A @ B) + bias``, so the
adapted kernel W' is never built on the training path (``AdapterConfig.forward="folded"`` routes
the calls through ``folded_dense`` instead: W0 + s A B built one layer at a time, the low-rank
gradients from a custom VJP). A targeted ``nn.Embed`` table is routed through ``core.embed`` (the
lookup and ``attend``, a tied head), a targeted ``nn.Conv`` kernel through ``core.conv`` (two
convolutions with the layer's own padding and strides; the factored form for either ``forward``).
A targeted leaf that no such call reads (a custom layer, a Dense with a custom ``dot_general``, a
DenseGeneral with ``batch_dims``, a grouped convolution, an input-axes rule the layer does not
contract), or that one of its calls cannot route, is merged into the params instead, so the result
is the same either way; ``fallback="error"`` turns that into an InjectError.

A layer whose kernel is stored quantized (``core.quantize.QuantizedKernel``, targeted or not) dequantizes
it inside its own call, under a remat that saves only the activations the layer's backward reads
(``core.dora.SAVED_ACTIVATIONS``): the backward dequantizes again from the codes instead of keeping every
layer's full-precision kernel alive, and keeps what the full-precision layer keeps.

Each layer reads its adapter from the ``adapters`` variable collection at its own scope, and its
dropout key from the ``adapter_dropout`` PRNG stream, both passed to ``apply_fn``: a lifted transform
over layers that maps every collection (``nn.scan`` with ``variable_axes={True: 0}``, as the zoo's
scanned Llama) hands each layer its slice of stacked adapters.

Finding which targets are intercepted costs one abstract trace of the model
(``jax.eval_shape``) per call, i.e. per compilation under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from opt_einsum import parser as einsum_parser

from dora_jax import targets
from dora_jax.core import (
    AdapterConfig,
    adapter_entries,
    check_adapter,
    check_projection,
    conv,
    embed,
    factored_dense,
    folded_dense,
    kernel_layout,
    merge,
    quantize,
    vera,
)
from dora_jax.core.config import FALLBACKS
from dora_jax.core.dora import Adapter, saved_activations
from dora_jax.errors import ConfigError, InjectError, TargetError

ADAPTERS = "adapters"  # the variable collection the adapted apply passes the adapters in, per layer scope
DROPOUT_RNG = "adapter_dropout"  # the PRNG stream of the low-rank branch's dropout (split by a scan)


def _promote(module: nn.Module, x: jax.Array, kernel: jax.Array, bias: jax.Array | None):
    promote = getattr(module, "promote_dtype", promote_dtype)
    return promote(x, kernel, bias, dtype=module.dtype)


def _custom_dot(module: nn.Module) -> bool:
    return getattr(module, "dot_general", None) is not None or getattr(module, "dot_general_cls", None) is not None


# A handler returns the layer's output, or a string: why the call cannot take the adapted forward.
def _dense(module, args, kwargs, kernel, bias, axes, layer):
    if _custom_dot(module):
        return "its nn.Dense has a custom dot_general"
    if len(args) != 1 or kwargs:
        return "its nn.Dense is called with extra arguments"
    if axes != (0,):
        return f"input_axes {axes} differ from nn.Dense's contraction over axis 0"
    x, _, bias = _promote(module, args[0], kernel, bias)
    return layer.dense(x, kernel, bias, module.precision)


def _dense_general(module, args, kwargs, kernel, bias, axes, layer):
    if _custom_dot(module):
        return "its nn.DenseGeneral has a custom dot_general"
    if module.batch_dims:
        return "its nn.DenseGeneral has batch_dims"
    if len(args) != 1 or kwargs:
        return "its nn.DenseGeneral is called with extra arguments"
    x = args[0]
    contract = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    contract = tuple(a % x.ndim for a in contract)
    if axes != tuple(range(len(contract))):
        return f"input_axes {axes} differ from the kernel axes nn.DenseGeneral contracts {tuple(range(len(contract)))}"
    x, _, bias = _promote(module, x, kernel, bias)
    moved = jnp.moveaxis(x, contract, range(x.ndim - len(contract), x.ndim))
    batch_shape = moved.shape[: x.ndim - len(contract)]
    layout = kernel_layout(kernel.shape, axes)
    y = layer.dense(
        moved.reshape(batch_shape + (layout.d_in,)),
        kernel.reshape(layout.d_in, layout.d_out),
        None if bias is None else bias.reshape(layout.d_out),
        module.precision,
    )
    return y.reshape(batch_shape + layout.out_shape)


def _einsum(module, args, kwargs, kernel, bias, axes, layer):
    if getattr(module, "preferred_element_type", None) is not None:
        return "its nn.Einsum sets preferred_element_type"
    if len(args) > 2:
        return "its nn.Einsum is called with extra arguments"
    x = args[0]
    spec = kwargs.get("einsum_str", args[1] if len(args) == 2 else None) or module.einsum_str
    operands, result, _ = einsum_parser.parse_einsum_input((spec.replace(" ", ""), x, kernel))
    x_spec, w_spec = operands.split(",")
    contracted = {c for c in w_spec if c in x_spec and c not in result}
    outputs = [c for c in w_spec if c not in x_spec and c in result]
    kept = [c for c in x_spec if c in result]
    plain = (
        len(set(x_spec)) == len(x_spec)
        and len(set(w_spec)) == len(w_spec)
        and len(contracted) + len(outputs) == len(w_spec)  # no letter shared as a batch axis
        and all(c in w_spec or c in result for c in x_spec)  # no input-only summed letter
        and sorted(result) == sorted(kept + outputs)
        and {w_spec[a] for a in axes} == contracted
    )
    if not plain:
        return f"its einsum {spec!r} is not a plain contraction of input_axes {axes} (batch or summed-only letters)"
    x, _, bias = _promote(module, x, kernel, bias)
    layout = kernel_layout(kernel.shape, axes)
    in_letters = "".join(w_spec[a] for a in layout.input_axes)
    out_letters = "".join(w_spec[a] for a in layout.output_axes)
    kept = "".join(kept)
    x2 = jnp.einsum(f"{x_spec}->{kept}{in_letters}", x)
    batch_shape = x2.shape[: len(kept)]
    y = layer.dense(x2.reshape(batch_shape + (layout.d_in,)), layout.to_matrix(kernel), None, module.precision)
    y = jnp.einsum(f"{kept}{out_letters}->{result}", y.reshape(batch_shape + layout.out_shape))
    if bias is not None:
        y = y + bias.reshape([kernel.shape[w_spec.index(c)] if c in w_spec else 1 for c in result])
    return y


def _embed_call(module, args, kwargs, table, bias, axes, layer):
    if axes != (0,):
        return f"input_axes {axes} differ from nn.Embed's vocabulary axis (0,)"
    if len(args) != 1 or kwargs or module.num_embeddings == 1:
        return "its nn.Embed is called with extra arguments or has one embedding"
    # the dtype nn.Embed would look rows up in, without casting the whole table to find it
    dtype = jax.eval_shape(lambda t: module.promote_dtype(t, dtype=module.dtype, inexact=False)[0], table).dtype
    return layer.lookup(args[0], table, dtype)


def _embed_attend(module, args, kwargs, table, bias, axes, layer):
    if axes != (0,):
        return f"input_axes {axes} differ from nn.Embed's vocabulary axis (0,)"
    if len(args) != 1 or kwargs:
        return "its nn.Embed.attend is called with extra arguments"
    query, promoted = module.promote_dtype(args[0], table, dtype=module.dtype)
    return layer.attend(query, table).astype(promoted.dtype)


def _conv(module, args, kwargs, kernel, bias, axes, layer):
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
        return "its nn.Conv has a custom conv_general_dilated"
    if module.mask is not None or module.feature_group_count != 1:
        return "its nn.Conv has a kernel mask or feature_group_count > 1"
    if len(args) != 1 or kwargs:
        return "its nn.Conv is called with extra arguments"
    if axes != tuple(range(kernel.ndim - 1)):
        return (
            f"input_axes {axes} differ from the axes nn.Conv contracts {tuple(range(kernel.ndim - 1))} "
            "(window and input channels; add an input_axes rule)"
        )
    x, _, bias = _promote(module, args[0], kernel, bias)

    def convolve(inputs, weights):  # the layer's own padding, strides and dilations, any channel count
        clone = module.clone(parent=None, features=weights.shape[-1], use_bias=False)
        return clone.apply({"params": {"kernel": weights}}, inputs)

    return layer.conv(convolve, x, kernel, bias)


# Per layer type: the leaf it adapts and a handler per method that reads it. A method of a targeted
# layer without a handler (other than setup) marks the leaf unroutable: it is merged instead.
_HANDLERS: tuple[tuple[type, str, dict[str, Callable]], ...] = (
    (nn.Dense, "kernel", {"__call__": _dense}),
    (nn.DenseGeneral, "kernel", {"__call__": _dense_general}),
    (nn.Einsum, "kernel", {"__call__": _einsum}),
    (nn.Embed, "embedding", {"__call__": _embed_call, "attend": _embed_attend}),
    (nn.Conv, "kernel", {"__call__": _conv}),
)


class _Adapted:
    """One targeted layer's adapter in matrix form, with the forwards its handlers call."""

    def __init__(self, matrices: Adapter, cfg: AdapterConfig, dropout_rng: jax.Array | None):
        self.matrices, self.cfg, self.dropout_rng = matrices, cfg, dropout_rng

    def dense(self, x, w0, bias, precision):
        dense = folded_dense if self.cfg.forward == "folded" else factored_dense
        return dense(x, w0, self.matrices, self.cfg, bias=bias, dropout_rng=self.dropout_rng, precision=precision)

    def conv(self, convolve, x, w0, bias):
        return conv.factored_conv(convolve, x, w0, self.matrices, self.cfg, bias=bias, dropout_rng=self.dropout_rng)

    def lookup(self, ids, table, dtype):
        return embed.lookup(ids, table, self.matrices, self.cfg).astype(dtype)

    def attend(self, query, table):
        return embed.attend(query, table, self.matrices, self.cfg)


class _Plain:
    """A frozen layer's own forward (no adapter), for a layer whose quantized kernel the router dequantizes."""

    def dense(self, x, w0, bias, precision):
        y = jax.lax.dot_general(x, w0, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
        return y if bias is None else y + bias

    def conv(self, convolve, x, w0, bias):
        y = convolve(x, w0)
        return y if bias is None else y + bias


def _call(handler, module, args, kwargs, kernel, bias, axes, layer):
    """``handler``'s output (or its refusal); a quantized kernel is dequantized inside the layer, under a
    remat that saves the layer's named activations only (a frozen layer's: none), so that the backward
    dequantizes it again rather than keeping the full-precision kernel of every layer alive."""
    if not quantize.is_quantized(kernel):
        return handler(module, args, kwargs, kernel, bias, axes, layer)
    refusal: list[str] = []

    def body(kernel):
        out = handler(module, args, kwargs, quantize.dequantize(kernel), bias, axes, layer)
        if isinstance(out, str):
            refusal.append(out)
            return jnp.zeros(())
        return out

    out = jax.checkpoint(body, policy=saved_activations())(kernel)
    return refusal[0] if refusal else out


class _Router:
    """The method interceptor: sends targeted layer calls through ``factored_dense`` (or ``folded_dense``).

    A layer reads its adapter from the ``adapters`` variable collection at its own scope, so that a
    lifted transform over layers (``nn.scan`` with ``variable_axes={True: 0}``) hands each layer its
    slice; the adapter is checked against the kernel the layer sees.
    """

    def __init__(
        self,
        paths: Mapping[str, int],
        cfg: AdapterConfig,
        dropout: bool,
        projection: Adapter | None = None,
    ):
        # paths: each target's number of axes in the params tree (a stacked kernel: with its stack)
        self.paths, self.cfg, self.dropout, self.projection = paths, cfg, dropout, projection
        # a layer's slice of a stacked kernel is checked and routed without the stack
        self.per_layer = dataclasses.replace(cfg, stacked_axes=()) if cfg.stacked_axes else cfg
        self.handled: set[str] = set()
        self.refused: dict[str, str] = {}  # path -> why a call to it could not be routed
        self.busy = False

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if self.busy:  # a handler's own layer calls (nn.Conv's clones) are not targets
            return next_fun(*args, **kwargs)
        layer_type = next(((leaf, methods) for cls, leaf, methods in _HANDLERS if isinstance(module, cls)), None)
        if layer_type is None or context.method_name == "setup":
            return next_fun(*args, **kwargs)
        leaf, methods = layer_type
        path = "/".join(module.path + (leaf,))
        kernel = module.get_variable("params", leaf) if module.has_variable("params", leaf) else None
        if path not in self.paths and not quantize.is_quantized(kernel):
            return next_fun(*args, **kwargs)
        handler = methods.get(context.method_name)
        if path not in self.paths:  # a frozen quantized kernel: the layer's own forward, dequantized inside it
            return self._plain(module, context.method_name, handler, path, kernel, args, kwargs)
        if handler is None:
            self.refused[path] = f"its {type(module).__name__}.{context.method_name} reads it unrouted"
            return next_fun(*args, **kwargs)
        if not module.has_variable(ADAPTERS, leaf):
            self.refused[path] = (
                f"its layer runs inside a lifted transform (nn.scan, nn.vmap, ...) that does not pass the "
                f"{ADAPTERS!r} collection (give it variable_axes={{True: 0}} or list {ADAPTERS!r})"
            )
            return next_fun(*args, **kwargs)
        cfg = self.cfg
        if cfg.stacked_for(path):  # a lift over layers (nn.scan) hands each layer its slice of kernel and adapter
            if len(kernel.shape) == self.paths[path]:
                self.refused[path] = "it is stacked along leading layer axes (stacked_axes) and read whole"
                return next_fun(*args, **kwargs)
            cfg = self.per_layer
        adapter = dict(module.get_variable(ADAPTERS, leaf))
        check_adapter(path, kernel, adapter, cfg)
        if "lambda_d" in adapter:
            check_projection(path, kernel, self.projection, cfg)
        axes = cfg.axes_for(path, tuple(kernel.shape))
        matrices = kernel_layout(kernel.shape, axes).adapter_matrices(adapter, self.projection)
        rng = module.make_rng(DROPOUT_RNG) if self.dropout else None
        out = self._handle(handler, module, args, kwargs, kernel, axes, _Adapted(matrices, cfg, rng))
        if isinstance(out, str):
            self.refused[path] = out
            return next_fun(*args, **kwargs)
        self.handled.add(path)
        return out

    def _plain(self, module, method, handler, path, kernel, args, kwargs):
        if handler is None:
            out = f"its {type(module).__name__}.{method} has no dequantizing forward"
        else:
            out = self._handle(handler, module, args, kwargs, kernel, kernel.input_axes, _Plain())
        if isinstance(out, str):
            raise InjectError(f"{path!r} is quantized, but {out}: keep this layer's kernel unquantized")
        return out

    def _handle(self, handler, module, args, kwargs, kernel, axes, layer):
        """``handler`` on the layer's kernel and bias (``_call``), its own layer calls not intercepted."""
        bias = module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None
        self.busy = True
        try:
            return _call(handler, module, args, kwargs, kernel, bias, axes, layer)
        finally:
            self.busy = False


NOT_READ = "no nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed or nn.Conv call reads it (a custom layer?)"


def _run(apply_fn, params, adapters, router: _Router, args, kwargs, collections_, dropout_rng=None) -> Any:
    variables = {"params": params, ADAPTERS: adapters, **collections_}
    if dropout_rng is not None:
        kwargs = {**kwargs, "rngs": {**dict(kwargs.get("rngs") or {}), DROPOUT_RNG: dropout_rng}}
    with nn.intercept_methods(router):
        return apply_fn(variables, *args, **kwargs)


def _unrouted(apply_fn, cfg, paths, projection, params, adapters, args, kwargs, collections_) -> dict[str, str]:
    """{path: reason} after one abstract trace: the targets no layer call can route."""
    probe = _Router(paths, cfg, False, projection)

    def trace(params, adapters, projection):  # arrays or jax.ShapeDtypeStruct alike
        probe.projection = projection
        return _run(apply_fn, params, adapters, probe, args, kwargs, collections_)

    jax.eval_shape(trace, params, adapters, projection)
    # A leaf one call could not route is merged even where another call was routed: every read then sees W'.
    routed = probe.handled - set(probe.refused)
    return {p: probe.refused.get(p, NOT_READ) for p in sorted(set(paths) - routed)}


def _split(params: Any, adapters: Any, collections_: Mapping[str, Any]) -> tuple[dict[str, int], Any, Any]:
    """({target path: its leaf's number of axes}, the adapters without VeRA's projections, the projections);
    every adapter must name a leaf of ``params`` (its shapes are checked where a layer reads it, or where it
    is merged)."""
    if ADAPTERS in collections_:
        raise ConfigError(f"collections: {ADAPTERS!r} is the collection inject passes the adapters in; rename yours")
    paths = set(adapter_entries(adapters))
    leaves = targets.leaves_by_path(params)
    missing = sorted(paths - set(leaves))
    if missing:
        raise TargetError(
            f"adapters for {missing} name no leaf of the parameter tree. Available leaves:\n{targets.describe(params)}"
        )
    layered = {key: value for key, value in adapters.items() if key != vera.PROJECTION}
    return {path: len(leaves[path].shape) for path in paths}, layered, vera.projection_of(adapters)


def describe(unrouted: Mapping[str, str]) -> str:
    """``path: reason; ...``: the targets of ``merged_targets`` as one line for an error or a log."""
    return "; ".join(f"{path}: {why}" for path, why in unrouted.items())


def merged_targets(
    apply_fn: Callable[..., Any],
    cfg: AdapterConfig,
    params: Any,
    adapters: Any,
    *args: Any,
    collections: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, str]:
    """The targets ``inject(apply_fn, cfg)`` would merge (build W') instead of intercepting, each
    with the reason, for a call with these arguments (shapes suffice: one abstract trace)."""
    collections_ = dict(collections or {})
    paths, layered, projection = _split(params, adapters, collections_)
    return _unrouted(apply_fn, cfg, paths, projection, params, layered, args, kwargs, collections_)


def inject(apply_fn: Callable[..., Any], cfg: AdapterConfig, *, fallback: str | None = None) -> Callable[..., Any]:
    """Wraps a Flax ``apply`` so that ``f(params, adapters, *args, **kw)`` runs the adapted model.

    Keyword arguments of the returned function besides the model's own:
      dropout_rng: PRNG key for dropout on the low-rank branch (none when omitted: evaluation).
      collections: other variable collections to pass to ``apply`` (e.g. ``batch_stats``).
    ``fallback`` (default ``cfg.fallback``): "merge" merges targeted leaves no layer call can route
    (``merged_targets`` lists them with the reason); "error" raises InjectError instead.
    """
    fallback = cfg.fallback if fallback is None else fallback
    if fallback not in FALLBACKS:
        raise ConfigError(f"inject fallback: expected one of {FALLBACKS}; got {fallback!r}")

    def adapted_apply(
        params: Any,
        adapters: Any,
        *args: Any,
        dropout_rng: jax.Array | None = None,
        collections: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        collections_ = dict(collections or {})
        paths, layered, projection = _split(params, adapters, collections_)
        unrouted = _unrouted(apply_fn, cfg, paths, projection, params, layered, args, kwargs, collections_)
        if unrouted and fallback == "error":
            raise InjectError(
                f"targets the adapted forward cannot run ({describe(unrouted)}); "
                "use fallback='merge' to merge them instead"
            )
        if unrouted:
            entries = adapter_entries(adapters)
            merged = targets.nest({p: entries[p] for p in unrouted})
            params = merge(params, merged if projection is None else {**merged, vera.PROJECTION: projection}, cfg)
        dropout = dropout_rng is not None and cfg.dropout > 0
        routed = {path: ndim for path, ndim in paths.items() if path not in unrouted}
        router = _Router(routed, cfg, dropout, projection)
        rng = dropout_rng if router.dropout else None
        return _run(apply_fn, params, layered, router, args, kwargs, collections_, rng)

    return adapted_apply
