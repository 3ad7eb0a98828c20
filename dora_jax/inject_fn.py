"""Adapters for any function of a parameter pytree: ``inject_fn(fn, cfg)(params, adapters, *args)``.

``fn(params, *args, **kwargs)`` is any JAX function of a pytree of arrays: plain JAX, a Flax NNX model
called through ``nnx.merge(graphdef, params)(x)``, Equinox, ... ``inject_fn(fn, cfg)(params, adapters,
*args, **kwargs)`` equals ``fn(merge(params, adapters, cfg), *args, **kwargs)`` without building W' where
it need not: ``fn`` is traced to a jaxpr once per call (per compilation under ``jax.jit``), and the jaxpr
is evaluated equation by equation with each targeted leaf standing as itself. A ``dot_general`` that
contracts a targeted kernel over its input axes (``cfg.input_axes``) becomes ``factored_dense`` (or
``folded_dense``) on the kernel's matrix view (over its output axes, a tied head: ``core.embed.attend``);
a channels-last convolution ``core.conv.factored_conv``; a gather of whole rows of a table (an embedding
lookup) ``core.embed.lookup``. The kernel may reach its product through reshapes,
transposes and dtype casts that keep its input and output elements apart: their index arithmetic is
replayed on the kernel's element numbers (numpy, at trace time) to find which matrix rows and columns
the product reads. Calls to nested jitted functions are evaluated the same way, a remat (``jax.checkpoint``,
``nnx.remat``) under its own policy, a ``scan`` over a kernel stacked along leading layer axes
(``cfg.stacked_axes``) with each iteration handed its layer's kernel and adapter. Any other use of a
targeted leaf (a reduction, a custom-derivative call that receives it, a stacked kernel outside a scan, an
output) reads the merged W' instead, so the result is the same either way; ``fallback="error"``
(``AdapterConfig.fallback``) turns that into an InjectError naming the leaf and the operation.

A quantized kernel (``core.quantize.QuantizedKernel``, targeted or not) is traced as the array it stands
for and dequantized inside each equation that reads it, under a remat that saves only the adapted layers'
named activations: the backward dequantizes again from the codes, as ``dj.inject`` does.

Leaf paths are '/'-joined as for linen: an NNX ``Variable``'s payload (a trailing ``value`` attribute)
is not part of its path, so ``nnx.State`` and ``nnx.to_pure_dict`` give the same targets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from dora_jax import targets
from dora_jax.core import (
    AdapterConfig,
    conv,
    embed,
    factored_dense,
    folded_dense,
    kernel_layout,
    quantize,
    vera,
)
from dora_jax.core.adapters import matched_entries, merge_layers
from dora_jax.core.dora import saved_activations
from dora_jax.errors import InjectError

# Operations a targeted kernel passes through and stays itself: they move its elements (or cast them).
_MOVES = {"reshape", "transpose", "squeeze", "convert_element_type", "copy", "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call"}  # nested jitted functions: evaluated inline
# (a ``checkpoint`` equation, a remat, is evaluated under the same remat: ``_Evaluator.remat``)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """A targeted leaf, or a quantized one, as the traced function has moved it: ``value`` is the frozen
    ``leaf`` after the moves (in its stored dtype: casts are recorded, not applied; None for a quantized
    leaf, dequantized where it is read), ``moves`` the (primitive, params) applied since the leaf."""

    path: str
    leaf: Any
    value: jax.Array | None
    moves: tuple[tuple[Any, Any], ...] = ()
    stacked: int = 0  # leading axes of ``leaf`` that index layers (AdapterConfig.stacked_axes) not yet scanned over
    entry: dict | None = None  # a scanned slice's own adapter (else the path's)


def inject_fn(fn: Callable, cfg: AdapterConfig) -> Callable:
    """``adapted(params, adapters, *args, dropout_rng=None, **kwargs)``, equal to
    ``fn(merge(params, adapters, cfg), *args, **kwargs)``, with the factored forward where a targeted
    kernel feeds a matmul, convolution or embedding lookup (module docstring). ``args`` are pytrees of
    arrays; keyword arguments are closed over (they may be Python values). ``dropout_rng`` keys the
    adapter dropout (each adapted product folds in its own index)."""

    def adapted(params, adapters, *args, dropout_rng: jax.Array | None = None, **kwargs):
        entries = matched_entries(params, adapters, cfg)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=targets.is_parameter_node)
        paths = [targets.path_str(keypath) for keypath, _ in flat]
        leaves = [leaf for _, leaf in flat]

        def flat_fn(leaves, args):
            return fn(jax.tree_util.tree_unflatten(treedef, leaves), *args, **kwargs)

        # a quantized kernel is traced as the array it stands for
        shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) if quantize.is_quantized(x) else x for x in leaves]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(shapes, args)
        inputs = [
            _Kernel(p, leaf, None, stacked=cfg.stacked_for(p) if p in entries else 0)
            if quantize.is_quantized(leaf)
            else _Kernel(p, leaf, leaf, stacked=cfg.stacked_for(p))
            if p in entries
            else leaf
            for p, leaf in zip(paths, leaves, strict=True)
        ]
        inputs += jax.tree.leaves(args)
        evaluator = _Evaluator(cfg, entries, vera.projection_of(adapters), dropout_rng)
        outs = [evaluator.concrete(out, "is an output of the function") for out in evaluator.run(closed, inputs)]
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return adapted


def _bind(primitive, params, values):
    """``primitive`` applied to ``values`` as a jaxpr equation with ``params`` applies it."""
    return primitive.bind(*values, **primitive.get_bind_params(params))


class _Evaluator:
    """Evaluates a jaxpr with targeted leaves as ``_Kernel`` values (see the module docstring)."""

    def __init__(self, cfg: AdapterConfig, entries: dict, projection: Any, dropout_rng: jax.Array | None):
        self.cfg, self.entries, self.projection = cfg, entries, projection
        self.dropout_rng = dropout_rng
        self.calls = 0  # adapted products so far: each folds its own dropout key

    def run(self, closed, inputs) -> list[Any]:
        """The outputs of ``closed`` (a jaxpr and its constants) on ``inputs``; a kernel that is an output
        stays a ``_Kernel`` (a nested call or remat may hand one back unchanged)."""
        jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
        env: dict[Any, Any] = {}

        def read(var):
            return var.val if isinstance(var, jex.Literal) else env[var]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, inputs, strict=True))
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs], strict=True))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, values):
        kernels = [v for v in values if isinstance(v, _Kernel)]
        name = eqn.primitive.name
        if not kernels:
            return _bind(eqn.primitive, eqn.params, values)
        if name in _MOVES and len(values) == 1:
            (kernel,) = values
            moved = kernel.value
            if name != "convert_element_type" and moved is not None:
                moved = _bind(eqn.primitive, eqn.params, [moved])
            return dataclasses.replace(kernel, value=moved, moves=kernel.moves + ((eqn.primitive, eqn.params),))
        if name in _CALLS:
            return self.run(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")), values)
        if name in ("checkpoint", "remat2"):  # jax.checkpoint / nnx.remat / eqx.filter_checkpoint around a kernel's use
            return self.remat(eqn, values)
        if name == "scan":
            return self.scan(eqn, values)
        if any(k.value is None for k in kernels):
            return self.dequantizing(eqn, values)
        reason = f"is read by {name}"
        route = {"dot_general": self.dot, "conv_general_dilated": self.conv, "gather": self.gather}.get(name)
        if route is not None and any(k.stacked for k in kernels):
            reason = f"is stacked along leading layer axes (stacked_axes) and read by {name} outside a scan over them"
        elif route is not None and len(kernels) == 1:
            routed = route(eqn, values)
            if not isinstance(routed, str):
                return routed
            reason = routed
        return _bind(eqn.primitive, eqn.params, [self.concrete(v, reason) for v in values])

    def remat(self, eqn, values):
        """A ``checkpoint`` equation whose body reads a kernel: the body evaluated here, under the same
        remat (its policy), the kernels' arrays passed in as arguments."""
        where = [i for i, v in enumerate(values) if isinstance(v, _Kernel)]
        handed_back: dict[int, _Kernel] = {}  # outputs that are kernels (an NNX module's state passes through)

        def body(arrays, others):
            values_ = list(others)
            for i, (leaf, value) in zip(where, arrays, strict=True):
                values_[i] = dataclasses.replace(values[i], leaf=leaf, value=value)
            outs = self.run(eqn.params["jaxpr"], values_)
            handed_back.update((j, out) for j, out in enumerate(outs) if isinstance(out, _Kernel))
            plain = [None if isinstance(out, _Kernel) else out for out in outs]
            return plain, [(out.leaf, out.value) for out in outs if isinstance(out, _Kernel)]

        arrays = [(values[i].leaf, values[i].value) for i in where]
        others = [None if isinstance(v, _Kernel) else v for v in values]
        policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
        plain, kernels = jax.checkpoint(body, policy=policy, prevent_cse=prevent_cse)(arrays, others)
        for j, (leaf, value) in zip(sorted(handed_back), kernels, strict=True):
            plain[j] = dataclasses.replace(handed_back[j], leaf=leaf, value=value)
        return plain

    def scan(self, eqn, values):
        """A ``lax.scan`` (``nnx.scan``, ...) whose scanned inputs include a stacked kernel: the body evaluated
        here, each iteration handed the kernel's next layer and that layer's adapter. A kernel it closes over
        stays itself; one in the carry, or stacked but moved before the scan, reads W'."""
        params = eqn.params
        consts, count = params["num_consts"], params["num_carry"]
        carry = [self.concrete(v, "is carried by a scan") for v in values[consts : consts + count]]
        xs, sliced = list(values[consts + count :]), {}
        for i, value in enumerate(xs):
            if isinstance(value, _Kernel):
                if value.stacked and value.value is not None and not _moved(value):
                    sliced[i] = value
                    xs[i] = (value.leaf, self.entry(value))
                else:
                    reason = "is scanned over without stacked_axes saying its leading axis indexes layers"
                    xs[i] = self.concrete(value, reason if not value.stacked else "is moved or quantized before a scan")
        base_rng = self.dropout_rng

        def body(carry, x):
            *x, index = x
            for i, kernel in sliced.items():
                leaf, entry = x[i]
                x[i] = dataclasses.replace(kernel, leaf=leaf, value=leaf, stacked=kernel.stacked - 1, entry=entry)
            if base_rng is not None:  # each layer its own dropout masks
                self.dropout_rng = jax.random.fold_in(base_rng, index)
            try:
                outs = self.run(params["jaxpr"], [*values[:consts], *carry, *x])
            finally:
                self.dropout_rng = base_rng
            outs = [self.concrete(out, "is an output of a scan's body") for out in outs]
            return outs[:count], outs[count:]

        steps = jnp.arange(params["length"])
        carry, ys = jax.lax.scan(
            body, carry, [*xs, steps], length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
        )
        return [*carry, *ys]

    def dequantizing(self, eqn, values):
        """The equation with its quantized kernels dequantized inside it, under a remat that saves only the
        adapted layers' named activations (``core.dora.SAVED_ACTIVATIONS``; a frozen layer's: none): the
        backward dequantizes again from the codes rather than keep every full-precision kernel alive."""
        lazy = [i for i, v in enumerate(values) if isinstance(v, _Kernel) and v.value is None]

        def body(leaves):
            values_ = list(values)
            for i, leaf in zip(lazy, leaves, strict=True):
                kernel, w = values_[i], quantize.dequantize(leaf)
                if kernel.path not in self.entries:  # a frozen kernel: the array it stands for, moved
                    values_[i] = _moved_value(w, kernel.moves, casts=True)
                else:
                    values_[i] = dataclasses.replace(kernel, leaf=w, value=_moved_value(w, kernel.moves, casts=False))
            return self.equation(eqn, values_)

        return jax.checkpoint(body, policy=saved_activations())([values[i].leaf for i in lazy])

    def concrete(self, value: Any, reason: str) -> Any:
        """A value for an ordinary operation: a ``_Kernel`` becomes the merged W' (a frozen quantized one its
        dequantized values), moved as it was."""
        if not isinstance(value, _Kernel):
            return value
        leaf = quantize.dequantized(value.leaf)
        if value.path in self.entries:
            if self.cfg.fallback == "error":
                raise InjectError(f"{value.path}: {reason}; inject_fn merges it there unless fallback='error'")
            leaf = merge_layers(leaf, self.entry(value), self.cfg, self.axes(value), self.projection, value.stacked)
        return _moved_value(leaf, value.moves, casts=True)

    def entry(self, kernel: _Kernel) -> dict:
        """The adapter of ``kernel``: its path's, or a scanned layer's own."""
        return self.entries[kernel.path] if kernel.entry is None else kernel.entry

    def axes(self, kernel: _Kernel) -> tuple[int, ...]:
        """The input axes of one layer of ``kernel`` (all of it, unstacked)."""
        return self.cfg.axes_for(kernel.path, tuple(kernel.leaf.shape[kernel.stacked :]))

    def dropout_key(self) -> jax.Array | None:
        """The next adapted call's dropout key (each call folds its own)."""
        self.calls += 1
        return None if self.dropout_rng is None else jax.random.fold_in(self.dropout_rng, self.calls)

    def matrices(self, kernel: _Kernel):
        layout = kernel_layout(tuple(kernel.leaf.shape), self.axes(kernel))
        return layout, layout.adapter_matrices(self.entry(kernel), self.projection)

    def conv(self, eqn, values):
        """``core.conv.factored_conv`` for a convolution over a targeted kernel in Flax's layout
        (``(*window, c_in, c_out)``, channels last), or the reason it cannot be routed."""
        kernel, x = values[1], values[0]
        refusal = "is read by a convolution that is not Flax's ungrouped, channels-last one over its input axes"
        if not isinstance(kernel, _Kernel):  # the kernel is the convolution's input
            return refusal
        params, ndim = eqn.params, kernel.leaf.ndim
        numbers = params["dimension_numbers"]
        flax_layout = (ndim - 1, ndim - 2, *range(ndim - 2))  # rhs_spec: out, in, window
        if (
            _moved(kernel)
            or tuple(numbers.rhs_spec) != flax_layout
            or numbers.out_spec[1] != ndim - 1
            or params["feature_group_count"] != 1
            or params["batch_group_count"] != 1
            or self.axes(kernel) != tuple(range(ndim - 1))
        ):
            return refusal
        _, matrices = self.matrices(kernel)

        def convolve(inputs, weights):
            return _bind(eqn.primitive, params, [inputs, weights])

        y = conv.factored_conv(convolve, x, kernel.value, matrices, self.cfg, dropout_rng=self.dropout_key())
        return y.astype(eqn.outvars[0].aval.dtype)

    def gather(self, eqn, values):
        """An embedding lookup (``jnp.take(table, ids, axis=0)``) of a targeted table as ``core.embed``
        computes it: rows of W0 and A gathered, ``(m / n) (W0[ids] + s A[ids] B)``."""
        table, indices = values
        numbers, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        if (
            not isinstance(table, _Kernel)
            or _moved(table)
            or table.leaf.ndim != 2
            or self.axes(table) != (0,)
            or tuple(numbers.collapsed_slice_dims) != (0,)
            or tuple(numbers.start_index_map) != (0,)
            or tuple(numbers.offset_dims) != (indices.ndim - 1,)
            or tuple(sizes) != (1, table.leaf.shape[1])
            or numbers.operand_batching_dims
        ):
            return "is read by a gather that is not a lookup of whole rows"
        _, matrices = self.matrices(table)

        def take(rows):  # the equation's own gather (its index mode) of whole rows of another width
            return _bind(eqn.primitive, dict(eqn.params, slice_sizes=(1, rows.shape[1])), [rows, indices])

        y = embed.lookup(None, table.value, matrices, self.cfg, take=take)
        return y.astype(eqn.outvars[0].aval.dtype)

    def dot(self, eqn, values):
        """The factored (or folded) product of a ``dot_general`` with one targeted operand, or the reason
        it cannot be routed."""
        side = 0 if isinstance(values[0], _Kernel) else 1
        kernel, x = values[side], values[1 - side]
        contracting, batch = eqn.params["dimension_numbers"]
        k_contract, x_contract = tuple(contracting[side]), tuple(contracting[1 - side])
        if batch[side]:
            return "is read by a dot_general with batch dimensions on the kernel"
        k_free = tuple(d for d in range(kernel.value.ndim) if d not in k_contract)
        x_free = tuple(d for d in range(x.ndim) if d not in x_contract)
        layout, matrices = self.matrices(kernel)
        contracted = math.prod(kernel.value.shape[d] for d in k_contract)
        positions = f"is contracted over other axes than its input axes {layout.input_axes}"
        # x W'^T (a head tied to an embedding table) contracts the output axes: the view is then W'^T's
        for transposed in (False, True):
            order = (k_free + k_contract) if transposed else (k_contract + k_free)
            if contracted == (layout.d_out if transposed else layout.d_in):
                positions = _matrix_positions(kernel, layout, order)
                if not isinstance(positions, str):
                    break
        if isinstance(positions, str):
            return positions
        if positions is not None:  # the product reads the matrix view's rows and columns in another order
            rows, cols = positions
            matrices = {k: v[rows] if k == "a" else v[:, cols] if k == "b" else v[cols] for k, v in matrices.items()}
        w_view = jnp.transpose(kernel.value, order).reshape(layout.d_in, layout.d_out)
        x_view = jnp.transpose(x, x_free + x_contract).reshape(-1, layout.d_out if transposed else layout.d_in)
        if transposed:
            y = embed.attend(x_view, w_view, matrices, self.cfg)
        else:
            dense = folded_dense if self.cfg.forward == "folded" else factored_dense
            precision = eqn.params.get("precision")
            y = dense(x_view, w_view, matrices, self.cfg, dropout_rng=self.dropout_key(), precision=precision)
        free_shape = tuple(kernel.value.shape[d] for d in k_free)
        y = y.reshape(tuple(x.shape[d] for d in x_free) + free_shape)
        if side == 0:  # dot_general puts the lhs's free dimensions first
            y = jnp.moveaxis(y, tuple(range(len(x_free))), tuple(range(len(free_shape), y.ndim)))
        return y.astype(eqn.outvars[0].aval.dtype)


def _moved_value(value: jax.Array, moves, *, casts: bool) -> jax.Array:
    """``value`` moved as ``moves`` move it (with or without the dtype casts among them)."""
    for primitive, params in moves:
        if casts or primitive.name != "convert_element_type":
            value = _bind(primitive, params, [value])
    return value


def _moved(kernel: _Kernel) -> list[tuple[Any, Any]]:
    """The moves of ``kernel`` that rearrange its elements (not casts or copies)."""
    return [(p, params) for p, params in kernel.moves if p.name not in ("convert_element_type", "copy", "copy_p")]


def _matrix_positions(kernel: _Kernel, layout, order: tuple[int, ...]):
    """Where the moved kernel, its axes in ``order`` and flattened to (d_in, d_out), sits in the leaf's
    matrix view: None when in place, else (rows, columns) index arrays; a reason string when that view
    mixes input and output elements."""
    shape = tuple(kernel.leaf.shape)
    moved = _moved(kernel)
    if not moved and order == layout.permutation:
        return None
    index = np.arange(math.prod(shape)).reshape(shape)
    for primitive, params in moved:
        index = _move_indices(index, primitive.name, params)
        if index is None:
            return f"reaches its product through {primitive.name} with parameters inject_fn does not follow"
    view = np.transpose(index, order).reshape(layout.d_in, layout.d_out)
    matrix = np.transpose(np.arange(math.prod(shape)).reshape(shape), layout.permutation).reshape(-1)
    row_of, col_of = np.empty(matrix.size, np.int64), np.empty(matrix.size, np.int64)
    row_of[matrix], col_of[matrix] = np.arange(matrix.size) // layout.d_out, np.arange(matrix.size) % layout.d_out
    rows, cols = row_of[view], col_of[view]
    if not ((rows == rows[:, :1]).all() and (cols == cols[:1]).all()):
        return "is moved so that its input and output elements mix before a dot_general"
    rows, cols = rows[:, 0], cols[0]
    if (rows == np.arange(rows.size)).all() and (cols == np.arange(cols.size)).all():
        return None
    return rows, cols


def _move_indices(index: np.ndarray, name: str, params) -> np.ndarray | None:
    """``index`` moved as the primitive moves an array, or None for parameters not followed."""
    if name == "reshape":
        return None if params.get("dimensions") is not None else index.reshape(params["new_sizes"])
    if name == "transpose":
        return np.transpose(index, params["permutation"])
    if name == "squeeze":
        return np.squeeze(index, axis=tuple(params["dimensions"]))
    return None
