"""Building blocks shared by the model zoo: norms, activations, attention masks, rotary embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dora_jax.errors import ConfigError
from dora_jax.models import splash

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0)))),  # PyTorch's erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation an HF config names in ``hidden_act``."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(
    features: int, axes: tuple[str | None, str | None], *, name: str, use_bias: bool, dtype, param_dtype, std=0.02
):
    """A 2-D ``nn.Dense`` with logical axis names on its kernel and bias."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def embed(num: int, features: int, axes: tuple[str | None, str | None], *, name: str, dtype, param_dtype, std=0.02):
    """An ``nn.Embed`` with logical axis names on its table."""
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        name=name,
    )


class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama computes it: in float32, scaled after casting back."""

    eps: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(dtype) * normed.astype(dtype)


def layer_norm(eps: float, *, name: str, dtype, param_dtype) -> nn.LayerNorm:
    """LayerNorm with the two-pass variance PyTorch uses and logical axis names."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def attention_bias(
    query_len: int,
    key_len: int,
    attention_mask: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None = None,
    query_offset: int = 0,
) -> jax.Array:
    """Boolean (batch or 1, 1, query, key) mask: True where a query may attend to a key.

    ``attention_mask`` is the (batch, key) 1/0 padding mask; ``query_offset`` is the position
    of the first query (for decoding with a cache).
    """
    allowed = jnp.ones((1, 1, query_len, key_len), bool)
    q = jnp.arange(query_len)[:, None] + query_offset
    k = jnp.arange(key_len)[None, :]
    if causal:
        allowed = allowed & (k <= q)
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].astype(bool)
    return allowed


@flax.struct.dataclass
class AttentionMask:
    """A mask with the structure it was built from: ``allowed`` as ``attention_bias`` gives it, and what a
    kernel with structured masks (``models.splash``) needs instead: the (batch, key) padding mask, causal,
    the sliding window, and whether the queries are the keys (no cache offset)."""

    allowed: jax.Array
    padding: jax.Array | None
    causal: bool = flax.struct.field(pytree_node=False)
    sliding_window: int | None = flax.struct.field(pytree_node=False)
    aligned: bool = flax.struct.field(pytree_node=False)


def attention_mask(
    query_len: int,
    key_len: int,
    attention_mask: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None = None,
    query_offset: int | jax.Array = 0,
) -> AttentionMask:
    """``attention_bias`` with its structure kept (``AttentionMask``)."""
    allowed = attention_bias(
        query_len, key_len, attention_mask, causal=causal, sliding_window=sliding_window, query_offset=query_offset
    )
    aligned = query_len == key_len and isinstance(query_offset, int) and query_offset == 0
    return AttentionMask(allowed, attention_mask, causal, sliding_window, aligned)


# How attention is computed (``model.attention``): "recompute", the custom-VJP kernel below (no
# query x key array kept for the backward; what XLA:CPU runs best); "xla" and "cudnn",
# ``jax.nn.dot_product_attention``'s implementations (cuDNN's fused flash attention on NVIDIA GPUs);
# "splash", Pallas' splash attention for TPUs (``models.splash``); "auto" picks per backend when the
# model is traced (``resolve_attention``).
ATTENTIONS = ("auto", "recompute", "xla", "cudnn", "splash")


def check_attention(attention: str) -> None:
    """Raises ConfigError naming the choices unless ``attention`` is an entry of ``ATTENTIONS``."""
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention: expected one of {list(ATTENTIONS)}; got {attention!r}")


def resolve_attention(attention: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """The implementation ``attention`` names on ``backend`` (default: JAX's): "auto" is cuDNN on a GPU
    for 16-bit compute and head dims it fuses (multiples of 8 up to 128), splash attention on a TPU for
    head dims that are multiples of 128, XLA's otherwise on an accelerator, the recomputing kernel on CPU.
    "splash" on a GPU is a ConfigError (Pallas' TPU kernel would run in its interpreter there; on CPU it
    does, for tests)."""
    check_attention(attention)
    backend = backend or jax.default_backend()
    if attention == "splash" and backend == "gpu":
        raise ConfigError(
            "attention 'splash' is Pallas' TPU kernel (a GPU would run it in Pallas' interpreter): on a GPU "
            "choose 'cudnn', 'xla' or 'auto'"
        )
    if attention != "auto":
        return attention
    if backend == "cpu":
        return "recompute"
    fused = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0
    if backend == "tpu" and splash.supported(head_dim):
        return "splash"
    return "cudnn" if backend == "gpu" and fused and head_dim <= 128 else "xla"


def even_lengths(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q, k, v and the mask padded by one position where a sequence length is odd: cuDNN's masked
    training kernels take even lengths only (the paper's cutoff of 256 tokens gives 255 inputs). No
    real query attends the padded key; the padded query attends the padded key alone (or, with no
    padded key, no key: its output is dropped). The real rows' values and gradients are unchanged."""
    pad_q, pad_k = q.shape[1] % 2, k.shape[1] % 2
    if not (pad_q or pad_k):
        return q, k, v, allowed
    allowed = jnp.broadcast_to(allowed, (allowed.shape[0], 1, q.shape[1], k.shape[1]))
    allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))
    if pad_q and pad_k:
        allowed = allowed.at[:, :, -1, -1].set(True)

    def pad(x, extra):
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))

    return pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), allowed


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array | AttentionMask,
    implementation: str = "recompute",
) -> jax.Array:
    """Softmax attention with grouped key/value heads, scores and softmax in (at least) float32.

    q: (batch, query, heads, head_dim); k, v: (batch, key, kv_heads, head_dim) with heads a
    multiple of kv_heads; allowed: boolean, broadcastable to (batch, 1, query, key), or an
    ``AttentionMask`` (which "splash" needs: without one, or with a cache offset, XLA's runs instead).
    ``implementation``: an entry of ``ATTENTIONS`` ("auto" resolved by ``resolve_attention``).
    """
    implementation = resolve_attention(implementation, q.dtype, q.shape[-1])
    mask = allowed if isinstance(allowed, AttentionMask) else None
    allowed = allowed.allowed if mask is not None else allowed
    if implementation == "splash":
        if mask is not None and mask.aligned:
            return splash.splash_attention(q, k, v, mask)
        implementation = "xla"  # decoding with a cache: one query row at a time, no kernel to win
    if implementation != "recompute":  # k, v of a cache may be wider than the compute dtype
        query_len = q.shape[1]
        if implementation == "cudnn":
            q, k, v, allowed = even_lengths(q, k, v, allowed)
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=allowed, implementation=implementation
        )
        return out[:, :query_len]
    batch, query_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # Head-major operands, one explicit transpose each: q as (batch, kv_heads, groups * query,
    # head_dim), scaled by 1/sqrt(head_dim); k and v as (batch, kv_heads, key, head_dim). Every
    # operand is 4-d: a size-1 group axis (no GQA) made XLA:CPU copy the scores between layouts.
    q = q.reshape(batch, query_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * query_len, head_dim) * (1.0 / math.sqrt(head_dim))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _attention(q, k, v, allowed).reshape(batch, kv_heads, groups, query_len, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, query_len, heads, head_dim)


def _where_allowed(allowed: jax.Array, scores: jax.Array, fill) -> jax.Array:
    """``scores`` (batch, kv_heads, groups * query, key) where ``allowed`` (batch or 1, 1, query,
    key) holds, else ``fill``; the mask is broadcast over the groups, never copied per group."""
    *lead, rows, keys = scores.shape
    query_len = allowed.shape[-2]
    if rows == query_len:  # one query head per key/value head (or a mask shared by all queries)
        return jnp.where(allowed, scores, fill)
    grouped = scores.reshape(*lead, rows // query_len, query_len, keys)
    return jnp.where(allowed[:, :, None], grouped, fill).reshape(scores.shape)


def _masked_scores(q: jax.Array, k: jax.Array, allowed: jax.Array) -> jax.Array:
    """q k^T (q comes scaled) in float32 or wider, the dtype's minimum where a key is not allowed."""
    wide = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bhqd,bhtd->bhqt", q, k, preferred_element_type=wide)
    return _where_allowed(allowed, scores, jnp.finfo(wide).min)


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """softmax(q k^T) v over head-major operands (q scaled), with a recomputing backward.

    The backward keeps the per-query score maximum and softmax denominator (not the query x key
    probabilities), rebuilds the probabilities p from them, and takes the softmax gradient as
    p * (dp - rowsum(g * out)): a (query, head_dim) reduction in place of a (query, key) one.
    No seq^2 array outlives the layer; its cost against textbook autodiff is measured by
    ``scripts/attention_cost.py`` (docs/performance.md).
    """
    return _attention_forward(q, k, v, allowed)[0]


def _attention_forward(q, k, v, allowed):
    scores = _masked_scores(q, k, allowed)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - peak)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    out = jnp.einsum("bhqt,bhtd->bhqd", (exp / total).astype(v.dtype), v)
    # peak and total apart, not log-sum-exp: peak + log(total) rounds to peak in a row with no
    # allowed key (every score at the dtype's minimum), where the probabilities are 1 / key_len.
    return out, (q, k, v, allowed, peak, total, out)


def _attention_backward(residuals, g):
    q, k, v, allowed, peak, total, out = residuals
    probs = jnp.exp(_masked_scores(q, k, allowed) - peak) / total
    dv = jnp.einsum("bhqt,bhqd->bhtd", probs.astype(g.dtype), g)
    wide = probs.dtype
    dprobs = jnp.einsum("bhqd,bhtd->bhqt", g, v, preferred_element_type=wide)
    row = jnp.sum(g.astype(wide) * out.astype(wide), axis=-1, keepdims=True)
    # Masked scores are constants: no gradient, also in a row with no allowed key (uniform probs).
    dscores = _where_allowed(allowed, probs * (dprobs - row), 0.0).astype(q.dtype)
    dq = jnp.einsum("bhqt,bhtd->bhqd", dscores, k)
    dk = jnp.einsum("bhqt,bhqd->bhtd", dscores, q)
    return dq, dk, dv, None


_attention.defvjp(_attention_forward, _attention_backward)
