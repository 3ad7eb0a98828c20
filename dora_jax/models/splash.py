"""Pallas' splash attention (the TPU's fused flash attention kernel that ships with JAX) for the model zoo.

``model.attention="splash"`` ("auto" on a TPU for head dims it tiles, see ``layers.resolve_attention``)
runs ``jax.experimental.pallas.ops.tpu.splash_attention`` instead of XLA's attention. Its mask is
static (causal, or a local window) and padding becomes segment ids: a real query attends real keys
only, a padding query padding keys only (so no row is empty; its output is dropped anyway). Grouped
key/value heads run the multi-query kernel once per key/value head. Sequences are padded to a multiple
of 128 (the kernel's block), the padding as one more segment. Off a TPU the kernel runs in Pallas'
interpreter (slow; what the CPU tests check it with). Traced under an abstract mesh of more than one
device (``jax.sharding.use_abstract_mesh``: the train and scoring steps set theirs, ``parallel.under_mesh``)
the kernel runs per shard in a ``shard_map``: the batch split over the mesh's data and fsdp axes, heads
over its tensor axis where they divide.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

if TYPE_CHECKING:
    from dora_jax.models.layers import AttentionMask

BLOCK = 128  # the kernel's lane width: sequence blocks are multiples of it
BATCH_AXES = ("data", "fsdp")  # mesh axes a batch is split over (parallel.BATCH_AXES)
HEAD_AXIS = "tensor"  # the mesh axis heads are split over (parallel.DEFAULT_RULES: heads, kv)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Softmax attention of q (batch, seq, heads, head_dim) over k, v (batch, seq, kv_heads, head_dim)
    with splash attention; ``mask`` gives its structure (causal, window, padding). Queries are the keys
    (no cache offset): decoding with a cache uses XLA's attention instead (``layers.dot_product_attention``)."""
    batch, seq, heads, head_dim = q.shape
    segments = jnp.ones((batch, seq), jnp.int32) if mask.padding is None else mask.padding.astype(jnp.int32)
    padded = -(-seq // BLOCK) * BLOCK
    if padded != seq:  # the tail is a segment of its own (0, as padding tokens)
        q, k, v = (jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, padded - seq)))
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale
    k, v = k.astype(q.dtype), v.astype(q.dtype)

    def attend(q, k, v, segments):
        return _batched(q, k, v, segments, mask.causal, mask.sliding_window)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        attend = _per_shard(attend, mesh, batch, heads, k.shape[2])
    return attend(q, k, v, segments)[:, :seq]


def _per_shard(attend, mesh, batch: int, heads: int, kv_heads: int):
    """``attend`` in a shard_map over ``mesh``: a Pallas kernel is not partitioned by XLA (it would
    gather every operand onto every device), so each device runs it on its own slice."""
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names and mesh.shape[axis] > 1)
    if batch % math.prod(mesh.shape[axis] for axis in batch_axes):
        batch_axes = ()
    tensor = mesh.shape.get(HEAD_AXIS, 1)
    head_axis = HEAD_AXIS if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
    heads_spec = PartitionSpec(batch_axes or None, None, head_axis, None)
    return jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, PartitionSpec(batch_axes or None, None)),
        out_specs=heads_spec,
        check_vma=False,
    )


def _batched(q, k, v, segments, causal: bool, sliding_window: int | None) -> jax.Array:
    """The kernel over every batch row (and key/value head group) of head-minor operands."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # imported where it is used

    seq, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    groups = heads // kv_heads
    block = next(b for b in (512, 256, BLOCK) if seq % b == 0)
    sizes = dict(block_q=block, block_kv=block, block_kv_compute=block)
    sizes.update(block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    if sliding_window is not None:  # a key within the window's last `sliding_window` positions (layers.attention_bias)
        one = sa.LocalMask((seq, seq), window_size=(sliding_window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = sa.CausalMask((seq, seq))
    else:
        one = sa.FullMask((seq, seq))
    interpret = jax.default_backend() != "tpu"
    make = sa.make_splash_mha_single_device if groups == 1 else sa.make_splash_mqa_single_device
    masks = sa.MultiHeadMask([one] * (groups if groups > 1 else heads))
    kernel = make(masks, block_sizes=sa.BlockSizes(**sizes), interpret=interpret)

    def row(q, k, v, segments):  # q (seq, heads, d), k, v (seq, kv_heads, d): one batch row
        ids = sa.SegmentIds(q=segments, kv=segments)
        if groups == 1:
            return kernel(q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2), segment_ids=ids)
        grouped = q.reshape(seq, kv_heads, groups, -1).transpose(1, 2, 0, 3)  # (kv_heads, groups, seq, d)
        out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids), in_axes=(0, 1, 1))(grouped, k, v)
        return out.reshape(heads, seq, -1)

    return jax.vmap(row)(q, k, v, segments).transpose(0, 2, 1, 3)


def supported(head_dim: int) -> bool:
    """Whether "auto" takes splash attention on a TPU: head dims that fill the kernel's lanes (Llama's 128)."""
    return head_dim % BLOCK == 0
