"""A quantized frozen kernel (QDoRA / QLoRA): NF4 or int8 storage, dequantized one layer at a time.

The number formats are Google's ``qwix`` (``qwix.quantize`` / ``qwix.dequantize``): NF4 is QLoRA's
16-value code book with one float32 absmax per block of ``block_size`` inputs of an output column,
stored as uint4 (two values per byte in compiled memory); int8 is symmetric absmax, per output column
(``block_size=0``) or per block, with bitsandbytes' scale ``absmax / 127`` (qwix's default bound is
127.5). A kernel is quantized in its (d_in, d_out) matrix view (``kernel_layout``), so a block runs
along the inputs of one output column, as bitsandbytes' blocks run along a PyTorch weight's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax import targets
from dora_jax.core.dora import kernel_layout

SCHEMES = ("none", "nf4", "int8")
NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit weights
# Each scheme's block size when none is given: bitsandbytes' (NF4 blocks of 64; LLM.int8 one scale per row,
# i.e. per output column of a Flax kernel).
DEFAULT_BLOCKS = {"nf4": NF4_BLOCK, "int8": 0}
_INT8_BOUND = 127.5 / 127.0  # qwix's int8 bound is 127.5: an absmax factor gives bitsandbytes' 127


def _qwix():
    import qwix  # on first use: it adds ~0.7 s to importing dora_jax otherwise

    return qwix


@targets.register_parameter_node
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A kernel stored quantized: ``values`` (a ``qwix.QArray`` of its (d_in, d_out) matrix view:
    codes and one scale per block) and, static, the kernel's ``shape`` and ``dtype`` (what it
    dequantizes to), the ``input_axes`` the matrix view contracts, the ``scheme`` and ``block_size``.
    Leading axes added to every leaf (a stack of layers) slice like any pytree's."""

    values: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    input_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    scheme: str = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)


def nf4_codes() -> jax.Array:
    """NF4's 16 values (QLoRA, Appendix E), as qwix decodes the codes 0..15."""
    codes = jnp.arange(16, dtype=jnp.uint4).reshape(16, 1)
    qwix = _qwix()
    return qwix.dequantize(qwix.QArray(codes, jnp.ones((1, 1), jnp.float32), None, "nf4")).reshape(16)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedKernel)


def block_for(scheme: str, block_size: int | None) -> int:
    """``block_size``, or the scheme's default (``DEFAULT_BLOCKS``) for None; checked (``check_scheme``)."""
    check_scheme(scheme, block_size)
    return DEFAULT_BLOCKS.get(scheme, 0) if block_size is None else block_size


def check_scheme(scheme: str, block_size: int | None = None) -> None:
    """A clear error for an unknown scheme or a block size the scheme cannot use (None: its default)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: expected one of {SCHEMES}; got {scheme!r}")
    if block_size is None:
        return
    if scheme == "nf4" and block_size < 1:
        raise ValueError(f"quantize='nf4' needs a block size >= 1 (bitsandbytes uses {NF4_BLOCK}); got {block_size}")
    if block_size < 0:
        raise ValueError(f"quantize block size: expected >= 0 (0: one scale per output column); got {block_size}")


def quantize_kernel(
    kernel: jax.Array,
    scheme: str,
    block_size: int | None = None,
    input_axes: tuple[int, ...] = (0,),
    path: str = "kernel",
) -> QuantizedKernel:
    """``kernel`` quantized with ``scheme`` ("nf4" or "int8"); ``block_size`` inputs share a scale
    (int8: 0 = one scale per output column; None: the scheme's default, bitsandbytes'). d_in must be a
    multiple of the block size."""
    block_size = block_for(scheme, block_size)
    if scheme == "none":
        raise ValueError("quantize_kernel: scheme 'none' keeps the kernel as it is; do not call it")
    layout = kernel_layout(tuple(kernel.shape), input_axes)
    if block_size and layout.d_in % block_size:
        raise ValueError(
            f"{path!r}: d_in={layout.d_in} is not a multiple of the quantization block size {block_size} "
            "(a block runs along the inputs of one output column)"
        )
    values = _quantize_matrix(layout.to_matrix(kernel), scheme, block_size)
    dtype = jnp.dtype(kernel.dtype).name
    return QuantizedKernel(values, tuple(kernel.shape), dtype, layout.input_axes, scheme, block_size)


@functools.partial(jax.jit, static_argnames=("scheme", "block_size"))
def _quantize_matrix(matrix: jax.Array, scheme: str, block_size: int) -> Any:
    # Compiled: qwix's NF4 rounding compares every value with the 16 codes, which XLA fuses instead of
    # materialising a (d_in * d_out, 16) array.
    qwix, matrix = _qwix(), matrix.astype(jnp.float32)
    tiles = {0: block_size} if block_size else None
    if scheme == "nf4":
        return qwix.quantize(matrix, "nf4", channelwise_axes=(1,), tiled_axes=tiles)
    return qwix.quantize(
        matrix, jnp.int8, channelwise_axes=(1,), tiled_axes=tiles, calibration_method=f"absmax,{_INT8_BOUND!r}"
    )


def dequantize(kernel: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The kernel in its own shape, in ``dtype`` (default: the dtype it was quantized from): each code
    times its block's scale, in float32."""
    matrix = _qwix().dequantize(kernel.values)
    layout = kernel_layout(kernel.shape, kernel.input_axes)
    return layout.from_matrix(matrix).astype(dtype or kernel.dtype)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every quantized kernel dequantized (to ``dtype``, default each kernel's own)."""
    return jax.tree.map(lambda leaf: dequantized(leaf, dtype), tree, is_leaf=is_quantized)


def dequantized(leaf: Any, dtype: Any = None) -> Any:
    """``leaf`` dequantized (to ``dtype``, default its own) if it is a quantized kernel, else ``leaf``."""
    return dequantize(leaf, dtype) if is_quantized(leaf) else leaf


def quantize_params(
    params: Any,
    scheme: str,
    block_size: int | None = None,
    kernels: str = r".*kernel",
    input_axes: Mapping[str, tuple[int, ...]] | None = None,
) -> Any:
    """``params`` with every leaf whose '/'-joined path fully matches ``kernels`` quantized, its input
    axes from the first ``input_axes`` pattern (path regex -> axes) that matches, else (0,).
    ``scheme="none"`` returns ``params`` unchanged; ``block_size`` None: the scheme's default."""
    block_size = block_for(scheme, block_size)
    if scheme == "none":
        return params
    rules = [(re.compile(pattern), axes) for pattern, axes in (input_axes or {}).items()]
    wanted = re.compile(kernels)

    def one(keypath: Any, leaf: Any) -> Any:
        path = targets.path_str(keypath)
        if is_quantized(leaf) or not wanted.fullmatch(path):
            return leaf
        axes = next((axes for regex, axes in rules if regex.fullmatch(path)), (0,))
        return quantize_kernel(leaf, scheme, block_size, axes, path)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)
