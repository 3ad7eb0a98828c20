"""DoRA and LoRA math on single kernels: decomposition, column norms, merge, factored forward.

Convention (docs/concepts.md): a Flax kernel W0 is (d_in, d_out); ``||.||_c`` is the L2 norm of each
output column, over the input axes. For a kernel with more axes, the input axes are contracted
and the rest are outputs; it is viewed as the (d_in, d_out) matrix of a ``KernelLayout``.

Every column norm here is ``sqrt(sum(w**2) + NORM_EPS)``: the epsilon keeps a zero column finite
(PEFT has no guard and gives NaN) and is used both for the initial magnitude and for the norm
in the forward pass, so that ``m / n == 1`` at step 0 also for a zero column.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from dora_jax.core import vera
from dora_jax.core.config import AdapterConfig

Adapter = dict[str, jax.Array]

NORM_EPS = 1e-12  # inside the square root of every column norm; see the module docstring.
_EXACT = lax.Precision.HIGHEST  # the small norm matmuls must not drop to bf16 passes on TPU
# The activations an adapted layer's backward reads, named (``checkpoint_name``) where they are made:
# ``x A``, the output before the magnitude scale and the column norm. A remat that saves only these
# (``saved_activations``) recomputes nothing in the backward but what the weights give (``inject``'s
# dequantized kernels), and keeps one output-sized array per layer, as the plain layer does.
SAVED_ACTIVATIONS = ("low_rank_hidden", "unscaled_output", "column_norm")


def saved_activations():
    """The ``jax.checkpoint`` policy that keeps ``SAVED_ACTIVATIONS`` and nothing else."""
    return jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How an N-axis kernel is viewed as a (d_in, d_out) matrix: input axes first, in order."""

    input_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def permutation(self) -> tuple[int, ...]:
        return self.input_axes + self.output_axes

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        return jnp.transpose(kernel, self.permutation).reshape(self.d_in, self.d_out)

    def from_matrix(self, matrix: jax.Array) -> jax.Array:
        structured = matrix.reshape(self.in_shape + self.out_shape)
        inverse = sorted(range(len(self.permutation)), key=self.permutation.__getitem__)
        return jnp.transpose(structured, inverse)

    def adapter_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Shapes of A, B and m for this kernel: (*in_shape, r), (r, *out_shape), out_shape."""
        return {"a": self.in_shape + (rank,), "b": (rank,) + self.out_shape, "m": self.out_shape}

    def adapter_matrices(self, adapter: Adapter, projection: Adapter | None = None) -> Adapter:
        """A as (d_in, r), B as (r, d_out) and m as (d_out,) (a magnitude-only adapter has m alone).

        A VeRA / DVoRA adapter (``lambda_d``, ``lambda_b``) is expanded with the shared ``projection``
        (``core.vera.expand``): A and B are then the scaled slices of the projections.
        """
        out = {}
        if "a" in adapter:
            rank = adapter["a"].shape[-1]
            out = {"a": adapter["a"].reshape(self.d_in, rank), "b": adapter["b"].reshape(rank, self.d_out)}
        elif "lambda_d" in adapter:
            if projection is None:
                raise ValueError("a VeRA / DVoRA adapter needs the shared projections (adapters['vera_projection'])")
            out["a"], out["b"] = vera.expand(adapter, projection, self.d_in, self.d_out)
        if "m" in adapter:
            out["m"] = adapter["m"].reshape(self.d_out)
        return out


def kernel_layout(shape: tuple[int, ...], input_axes: tuple[int, ...] = (0,)) -> KernelLayout:
    """The matrix view of a kernel of ``shape`` whose ``input_axes`` are contracted."""
    ndim = len(shape)
    inputs = tuple(a % ndim for a in input_axes)
    outputs = tuple(a for a in range(ndim) if a not in inputs)
    return KernelLayout(inputs, outputs, tuple(shape[a] for a in inputs), tuple(shape[a] for a in outputs))


def norm_dtype(*dtypes: Any) -> jnp.dtype:
    """float32, or wider when an operand is wider: norms never run in half precision."""
    return jnp.result_type(jnp.float32, *dtypes)


def column_norm(matrix: jax.Array) -> jax.Array:
    """Guarded L2 norm of each column of a (d_in, d_out) matrix, in at least float32."""
    matrix = matrix.astype(norm_dtype(matrix.dtype))
    return jnp.sqrt(jnp.sum(matrix * matrix, axis=0) + NORM_EPS)


def decompose(kernel: jax.Array, input_axes: tuple[int, ...] = (0,)) -> tuple[jax.Array, jax.Array]:
    """Magnitude ``||W||_c`` (shape of the output axes) and unit-norm direction ``W / ||W||_c``."""
    layout = kernel_layout(kernel.shape, input_axes)
    matrix = layout.to_matrix(kernel)
    magnitude = column_norm(matrix)
    direction = (matrix.astype(magnitude.dtype) / magnitude).astype(kernel.dtype)
    return magnitude.reshape(layout.out_shape), layout.from_matrix(direction)


def factored_column_norm(w0: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||W0 + s A B||_c`` without the d_in x d_out sum, in at least float32.

    n^2 = ||W0||^2 + 2s sum_r B * (A^T W0) + s^2 sum_r B * ((A^T A) B); the extra work is
    O(r d_in d_out) and no (d_in, d_out) temporary other than W0 itself is read.
    """
    dtype = norm_dtype(w0.dtype, a.dtype, b.dtype)
    w0, a, b = w0.astype(dtype), a.astype(dtype), b.astype(dtype)
    base = jnp.sum(w0 * w0, axis=0)
    cross = jnp.sum(b * jnp.matmul(a.T, w0, precision=_EXACT), axis=0)
    low_rank = jnp.sum(b * jnp.matmul(jnp.matmul(a.T, a, precision=_EXACT), b, precision=_EXACT), axis=0)
    squared = base + 2.0 * scale * cross + scale * scale * low_rank
    # The expansion can cancel to a tiny negative number where W' is ~0; the true value is >= 0.
    return jnp.sqrt(jnp.maximum(squared, 0.0) + NORM_EPS)


def low_rank_sum(w0: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W0 + s A B for a (d_in, d_out) kernel, in the norm dtype (at least float32)."""
    dtype = norm_dtype(w0.dtype, a.dtype, b.dtype)
    return w0.astype(dtype) + scale * jnp.matmul(a.astype(dtype), b.astype(dtype), precision=_EXACT)


def merged_matrix(w0: jax.Array, adapter: Adapter, cfg: AdapterConfig) -> jax.Array:
    """W' for a (d_in, d_out) kernel and matrix-shaped adapter, in the norm dtype; a magnitude-only
    adapter (``{"m"}``) gives ``m * W0 / ||W0||_c``."""
    if "a" in adapter:
        w = low_rank_sum(w0, adapter["a"], adapter["b"], cfg.scale)
    else:
        w = w0.astype(norm_dtype(w0.dtype, adapter["m"].dtype))
    if not cfg.decomposed:
        return w
    norm = column_norm(w)
    if cfg.norm_grad == "detach":
        norm = lax.stop_gradient(norm)
    return w * (adapter["m"].astype(w.dtype) / norm)


def merge_kernel(
    kernel: jax.Array,
    adapter: Adapter,
    cfg: AdapterConfig,
    input_axes: tuple[int, ...] = (0,),
    projection: Adapter | None = None,
) -> jax.Array:
    """The adapted kernel W' = m * (W0 + sAB) / ||W0 + sAB||_c (DoRA; m * W0 / ||W0||_c for a
    magnitude-only adapter) or W0 + sAB (LoRA)."""
    layout = kernel_layout(kernel.shape, input_axes)
    merged = merged_matrix(layout.to_matrix(kernel), layout.adapter_matrices(adapter, projection), cfg)
    return layout.from_matrix(merged.astype(kernel.dtype))


def column_scale(w0: jax.Array, adapter: Adapter, cfg: AdapterConfig) -> jax.Array | None:
    """``m / n`` per output column of a (d_in, d_out) kernel and matrix-shaped adapter, ``n`` the factored
    norm of ``W0 + s A B`` (``||W0||_c`` for a magnitude-only adapter), detached for norm_grad="detach";
    None for LoRA / VeRA. For layers whose output the scale multiplies (embeddings, convolutions)."""
    if not cfg.decomposed:
        return None
    if "a" in adapter:
        norm = factored_column_norm(w0, adapter["a"], adapter["b"], cfg.scale)
    else:
        norm = column_norm(w0)
    if cfg.norm_grad == "detach":
        norm = lax.stop_gradient(norm)
    return adapter["m"].astype(norm.dtype) / norm


def low_rank_dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout on the low-rank branch input; the identity when rate is 0 or rng is None."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def factored_dense(
    x: jax.Array,
    w0: jax.Array,
    adapter: Adapter,
    cfg: AdapterConfig,
    *,
    bias: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """``y = (m / n) * (x @ W0 + s * (drop(x) @ A) @ B) + bias`` without building W'.

    ``x`` is (..., d_in) in the compute dtype; ``w0`` is (d_in, d_out) in its stored dtype (the
    matmul casts it to the compute dtype, the norm reads it as stored, so a bf16 forward over
    float32 weights keeps ``m / n == 1`` at init). The adapter holds matrices
    (``KernelLayout.adapter_matrices``). ``n`` is computed in float32 by
    ``factored_column_norm``; the bias is added after the magnitude scale and never scaled.
    For LoRA the scale is dropped: ``y = x @ W0 + s * (drop(x) @ A) @ B + bias``.

    ``s`` scales ``B`` (not the ``N x d_out`` product), and the backward applies ``m / n`` to
    ``W0`` and ``B`` instead of to the output gradient: autodiff of the plain expression spends
    a pass over an ``N x d_out`` array on each (see ``_factored_backward``).
    """
    if "a" not in adapter:
        return magnitude_dense(x, w0, adapter["m"], cfg, bias=bias, precision=precision)
    # Leading axes are flattened: with (batch, seq, d) operands XLA:CPU contracts the low-rank
    # gradients over two axes through a slow transposed copy (1.6x the step time of a 2-D matmul).
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    branch = low_rank_dropout(x, cfg.dropout, dropout_rng)
    mode = cfg.norm_grad if cfg.decomposed else "lora"
    magnitude = adapter["m"] if cfg.decomposed else None
    y = _factored(x, branch, w0, adapter["a"], adapter["b"], magnitude, cfg.scale, mode, precision)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def _scaled(matrix: jax.Array, scale: Any) -> jax.Array:
    """``scale * matrix`` computed in the wider of the two dtypes (a float32 scale stays float32)."""
    scale = jnp.asarray(scale)
    dtype = jnp.result_type(matrix.dtype, scale.dtype)
    return matrix.astype(dtype) * scale.astype(dtype)


def _low_rank_gradient(g_low: jax.Array, activation: jax.Array, dtype: Any, precision: Any) -> jax.Array:
    """``activation^T g_low`` (d, r), computed as the (r, d) product ``g_low^T activation``, transposed.

    XLA:CPU runs the (r, d) product about twice as fast as the (d, r) one (docs/performance.md);
    the barrier keeps its simplifier from folding the transpose back.
    """
    product = jnp.matmul(g_low.T, activation, precision=precision, preferred_element_type=dtype)
    return lax.optimization_barrier(product).T


def _after(value: jax.Array, dependency: jax.Array) -> jax.Array:
    """``value + 0 * (first entry of dependency)``: the same numbers, computed once ``dependency`` exists.

    Kernels a backward rebuilds from forward values (``W0 m/n``, ``W0 + s A B``) would otherwise be
    scheduled by XLA:CPU as soon as the forward ends and all held through the backward (+5% peak
    on MiniLM); ``lax.optimization_barrier`` does not prevent it there (XLA:CPU removes barriers
    before scheduling), a data dependency on the layer's output gradient does. A non-finite
    gradient entry makes the result non-finite, as it makes every gradient of the layer anyway.
    """
    first = jnp.sum(dependency.reshape(-1)[:1]).astype(value.dtype)  # 0 for an empty dependency
    return value + jnp.zeros((), value.dtype) * first


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _factored(x, branch, w0, a, b, m, scale, mode, precision):
    """The factored forward on 2-D ``x``; ``branch`` is the low-rank input (``x`` or its dropout)."""
    return _factored_forward(x, branch, w0, a, b, m, scale, mode, precision)[0]


def _factored_forward(x, branch, w0, a, b, m, scale, mode, precision):
    hidden = checkpoint_name(jnp.matmul(branch, a.astype(x.dtype), precision=precision), "low_rank_hidden")
    z = jnp.matmul(x, w0.astype(x.dtype), precision=precision) + jnp.matmul(
        hidden, _scaled(b, scale).astype(x.dtype), precision=precision
    )
    if mode == "lora":
        return z, (x, branch, w0, a, b, m, hidden, None, None)
    z = checkpoint_name(z, "unscaled_output")
    norm = checkpoint_name(factored_column_norm(w0, a, b, scale), "column_norm")
    # z (not y) is kept: dm needs sum(g * z), which y = z m/n cannot give back where m is 0.
    return z * (m.astype(norm.dtype) / norm).astype(x.dtype), (x, branch, w0, a, b, m, hidden, z, norm)


def _factored_backward(scale, mode, precision, residuals, g):
    """Autodiff's gradients with ``s`` and ``m/n`` applied to ``W0`` and ``B``, never to ``g``.

    ``dx = g (W0 m/n)^T + g_low A^T`` with ``g_low = s g (B m/n)^T``; ``dA = drop(x)^T g_low``,
    ``dB = s (x A)^T g m/n``, ``dm = sum_N(g * z) / n`` and, for ``exact``, the norm's own
    gradient (a d_in x d_out-sized VJP, no activation) with cotangent ``-sum_N(g * z) m / n^2``.
    LoRA is the same with ``m/n = 1``.
    """
    x, branch, w0, a, b, m, hidden, z, norm = residuals
    dtype, wide = x.dtype, norm_dtype(w0.dtype, a.dtype, b.dtype)
    column_scale = 1.0 if mode == "lora" else _after(m.astype(wide) / norm, g)
    kernel = w0 if mode == "lora" else _scaled(w0, column_scale)
    g_low = jnp.matmul(g, _scaled(b, scale * column_scale).astype(dtype).T, precision=precision)
    dx = jnp.matmul(g, kernel.astype(dtype).T, precision=precision)
    d_branch = jnp.matmul(g_low, a.astype(dtype).T, precision=precision)
    da = _low_rank_gradient(g_low, branch, wide, precision)
    db = scale * jnp.matmul(hidden.T, g, precision=precision, preferred_element_type=wide) * column_scale
    dw0 = jnp.matmul(x.T, g, precision=precision, preferred_element_type=wide) * column_scale  # dead unless W0 trains
    dm = None
    if mode != "lora":
        d_column_scale = jnp.sum(g.astype(wide) * z.astype(wide), axis=0)
        dm = (d_column_scale / norm).astype(m.dtype)
        if mode == "exact":
            _, norm_vjp = jax.vjp(lambda w0_, a_, b_: factored_column_norm(w0_, a_, b_, scale), w0, a, b)
            dw0_n, da_n, db_n = norm_vjp(-d_column_scale * m.astype(wide) / (norm * norm))
            dw0, da, db = dw0 + dw0_n, da + da_n, db + db_n
    return dx, d_branch, dw0.astype(w0.dtype), da.astype(a.dtype), db.astype(b.dtype), dm


_factored.defvjp(_factored_forward, _factored_backward)


def folded_dense(
    x: jax.Array,
    w0: jax.Array,
    adapter: Adapter,
    cfg: AdapterConfig,
    *,
    bias: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """``factored_dense``'s output with ``s A B`` folded into the layer's kernel for the matmul.

    Forward: ``W' = W0 + s A B`` (float32, this layer only), ``y = (m / n) * (x @ W') + bias``.
    Backward (a custom VJP): ``dx = g @ (W' m/n)^T`` and the low-rank gradients
    ``dA = s x^T (g (B m/n)^T)``, ``dB = s ((x A)^T g) m/n``, never the N x d_in x d_out weight
    gradient. Against the factored forward this drops two passes over the activations per layer
    (the ``(x A) B`` output and the ``(g B^T) A^T`` input gradient) for one d_in x d_out kernel
    built per layer and call. With dropout active the branch input differs from ``x``: that call
    takes ``factored_dense``. Gradients equal the factored path's (to rounding) for x, W0, A, B, m.
    """
    if (cfg.dropout > 0 and dropout_rng is not None) or "a" not in adapter:
        return factored_dense(x, w0, adapter, cfg, bias=bias, dropout_rng=dropout_rng, precision=precision)
    lead = x.shape[:-1]
    mode = cfg.norm_grad if cfg.decomposed else "lora"
    y = _folded_matmul(
        x.reshape(-1, x.shape[-1]), w0, adapter["a"], adapter["b"], adapter.get("m"), cfg.scale, mode, precision
    )
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


def _folded_kernel(w0, a, b, m, scale, mode):
    """W' = W0 + s A B in the norm dtype, its guarded column norm n and the scale m / n (DoRA)."""
    w = low_rank_sum(w0, a, b, scale)
    if mode == "lora":
        return w, None, None
    norm = column_norm(w)
    return w, norm, m.astype(w.dtype) / norm


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _folded_matmul(x, w0, a, b, m, scale, mode, precision):
    return _folded_forward(x, w0, a, b, m, scale, mode, precision)[0]


def _folded_forward(x, w0, a, b, m, scale, mode, precision):
    w, _, column_scale = _folded_kernel(w0, _after(a, x), b, m, scale, mode)
    z = jnp.matmul(x, w.astype(x.dtype), precision=precision)
    if column_scale is None:
        return z, (x, w0, a, b, m, None)
    z = checkpoint_name(z, "unscaled_output")
    # z (not y) is kept: dm needs sum(g * z), which y = z m/n cannot give back where m is 0.
    return z * column_scale.astype(x.dtype), (x, w0, a, b, m, z)


def _folded_backward(scale, mode, precision, residuals, g):
    x, w0, a, b, m, z = residuals
    # W' is rebuilt here, once g exists (``_after``): not the forward's W' held until the backward
    # (a copy of every adapted weight), nor all layers' rebuilt W' made at once.
    a = _after(a, g)
    w, norm, column_scale = _folded_kernel(w0, a, b, m, scale, mode)
    dtype, wide = x.dtype, w.dtype
    b_wide = b.astype(wide)
    kernel, b_scaled = (w, b_wide) if column_scale is None else (w * column_scale, b_wide * column_scale)
    dx = jnp.matmul(g, kernel.astype(dtype).T, precision=precision)
    g_low = jnp.matmul(g, b_scaled.astype(dtype).T, precision=precision)  # (N, r) = g diag(m/n) B^T
    x_low = jnp.matmul(x, a.astype(dtype), precision=precision)  # (N, r) = x A
    da = scale * _low_rank_gradient(g_low, x, wide, precision)
    db = scale * jnp.matmul(x_low.T, g, precision=precision, preferred_element_type=wide)
    dw0 = jnp.matmul(x.T, g, precision=precision, preferred_element_type=wide)  # dead code unless W0 is differentiated
    dm = None
    if column_scale is not None:
        db, dw0 = db * column_scale, dw0 * column_scale
        d_column_scale = jnp.sum(g.astype(wide) * z.astype(wide), axis=0)
        dm = d_column_scale / norm
        if mode == "exact":  # through n = ||W'||_c: dW' += W' * k with k = -(dc m / n^3)
            k = -d_column_scale * m.astype(wide) / (norm * norm * norm)
            da = da + scale * jnp.matmul(w, (b_wide * k).T, precision=_EXACT)
            db = db + scale * jnp.matmul(a.astype(wide).T, w, precision=_EXACT) * k
            dw0 = dw0 + w * k
        dm = dm.astype(m.dtype)
    return dx, dw0.astype(w0.dtype), da.astype(a.dtype), db.astype(b.dtype), dm


_folded_matmul.defvjp(_folded_forward, _folded_backward)


def magnitude_dense(
    x: jax.Array,
    w0: jax.Array,
    magnitude: jax.Array,
    cfg: AdapterConfig,
    *,
    bias: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """A magnitude-only module: ``y = (m / ||W0||_c) * (x @ W0) + bias``, the layer's one matmul.

    The DoRA paper's cheapest setting (section 5.6) trains ``m`` alone on some modules. The
    backward (a custom VJP) applies ``m / n`` to ``W0`` rather than to the output gradient, as
    ``factored_dense`` does: ``dx = g (W0 m/n)^T``, ``dm = sum_N(g * (x W0)) / n``.
    """
    lead = x.shape[:-1]
    y = _magnitude_matmul(x.reshape(-1, x.shape[-1]), w0, magnitude, cfg.norm_grad, precision)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _magnitude_matmul(x, w0, m, mode, precision):
    return _magnitude_forward(x, w0, m, mode, precision)[0]


def _magnitude_forward(x, w0, m, mode, precision):
    z = checkpoint_name(jnp.matmul(x, w0.astype(x.dtype), precision=precision), "unscaled_output")
    norm = column_norm(w0)
    return z * (m.astype(norm.dtype) / norm).astype(x.dtype), (x, w0, m, z)


def _magnitude_backward(mode, precision, residuals, g):
    x, w0, m, z = residuals
    norm = column_norm(_after(w0, g))  # rebuilt once g exists (see _after), not held from the forward
    wide = norm.dtype
    column_scale = m.astype(wide) / norm
    dx = jnp.matmul(g, _scaled(w0, column_scale).astype(x.dtype).T, precision=precision)
    d_column_scale = jnp.sum(g.astype(wide) * z.astype(wide), axis=0)
    dw0 = jnp.matmul(x.T, g, precision=precision, preferred_element_type=wide) * column_scale  # dead: W0 is frozen
    if mode == "exact":  # through n = ||W0||_c
        dw0 = dw0 - w0.astype(wide) * (d_column_scale * m.astype(wide) / (norm * norm * norm))
    return dx, dw0.astype(w0.dtype), (d_column_scale / norm).astype(m.dtype)


_magnitude_matmul.defvjp(_magnitude_forward, _magnitude_backward)
