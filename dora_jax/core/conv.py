"""Adapted convolutions: ``conv(x, W')`` as two convolutions of ``x``, without building W'.

A convolution kernel ``W0: (*window, c_in, c_out)`` (Flax's layout, any spatial rank) is a kernel
whose input axes are all but the last (as PEFT defines the DoRA norm of a ConvNd: per output channel,
over the window and the input channels). Its adapter is ``A: (*window, c_in, r)``, ``B: (r, c_out)``,
``m: (c_out,)``: PEFT's ``lora_A`` (a convolution with the base layer's window and strides) and
``lora_B`` (a 1x1 convolution). A convolution is linear in its kernel, so
``conv(x, W0 + s A B) = conv(x, W0) + s conv(x, A) B`` and

    y = (m / n) * (conv(x, W0) + s conv(drop(x), A) B) + bias,   n = ||W0 + s A B||_c

with ``n`` from ``factored_column_norm``. The gradients are autodiff's: the weight gradient of
``conv(x, A)`` is r channels wide, never the ``c_out``-wide gradient of the full kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from dora_jax.core.config import AdapterConfig
from dora_jax.core.dora import Adapter, column_scale, low_rank_dropout

Convolution = Callable[[jax.Array, jax.Array], jax.Array]  # (x, kernel of any c_out) -> (..., c_out), no bias


def factored_conv(
    conv: Convolution,
    x: jax.Array,
    w0: jax.Array,
    adapter: Adapter,
    cfg: AdapterConfig,
    *,
    bias: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """``(m / n) * (conv(x, W0) + s conv(drop(x), A) B) + bias`` (LoRA: without ``m / n``).

    ``conv`` is the layer's convolution without its bias, for a kernel of any number of output
    channels (the layer's own padding, strides and dilations). ``w0`` is ``(*window, c_in, c_out)``;
    the adapter is in matrix form (``KernelLayout.adapter_matrices``: A ``(window * c_in, r)``); a
    magnitude-only adapter has m alone: ``(m / ||W0||_c) conv(x, W0) + bias``.
    """
    z = conv(x, w0)
    if "a" in adapter:
        a, b = adapter["a"], adapter["b"]
        branch = low_rank_dropout(x, cfg.dropout, dropout_rng)
        hidden = conv(branch, a.reshape(w0.shape[:-1] + (a.shape[-1],)).astype(z.dtype))
        z = z + checkpoint_name(hidden, "low_rank_hidden") @ (cfg.scale * b).astype(z.dtype)
    scale = column_scale(w0.reshape(-1, w0.shape[-1]), adapter, cfg)
    if scale is not None:
        z = checkpoint_name(z, "unscaled_output") * scale.astype(z.dtype)
    return z if bias is None else z + bias.astype(z.dtype)
