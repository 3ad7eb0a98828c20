"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in Flax linen, with HF parameter names.

Layers are plain 2-D ``nn.Dense`` kernels named as in HF (``q_proj`` ... ``down_proj``), so DoRA
targets read as in the paper and in PEFT: ``r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel"``.
``model.apply({"params": p}, input_ids, attention_mask=mask)`` returns logits (batch, seq, vocab).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.errors import ConfigError
from dora_jax.models import layers
from dora_jax.models.layers import (
    RMSNorm,
    activation,
    check_attention,
    dense,
    dot_product_attention,
    embed,
)
from dora_jax.models.stacking import LAYERS

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """The architecture numbers of a Llama-family checkpoint (read from and written to config.json)."""

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always True; Llama: attention_bias
    o_bias: bool = False  # Llama: attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    source: str = "{}"  # the config.json this came from, as JSON, so that export keeps every key

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a Llama-family type {MODEL_TYPES}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        activation(self.hidden_act)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads an HF ``config.json`` dict (legacy ``rope_scaling`` or v5 ``rope_parameters``)."""
        model_type = hf.get("model_type", "llama")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        heads = hf["num_attention_heads"]
        sliding = hf.get("sliding_window") if model_type == "mistral" else None
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError("qwen2 with use_sliding_window=true is not supported (its mask varies by layer)")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding,
            source=json.dumps(hf, sort_keys=True),
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict: the source keys, overwritten by these fields."""
        out = {key: value for key, value in json.loads(self.source).items() if key != "rope_parameters"}
        rope_scaling = None
        if self.rope_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            rope_scaling = {
                "rope_type": "llama3",
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            }
        architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out.update(
            model_type=self.model_type,
            architectures=[architecture[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            mlp_bias=self.mlp_bias,
        )
        if self.model_type == "llama":
            out["attention_bias"] = self.o_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding (head_dim / 2,), with Llama-3 / linear scaling."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_position_embeddings / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position_embeddings / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_position_embeddings / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates (batch, seq, heads, head_dim) by position, HF's rotate-half layout, in float32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # (b, s, d/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # an entry of layers.ATTENTIONS

    @nn.compact
    def __call__(self, x, positions, allowed, cache=None, cache_index=None):
        cfg = self.config
        batch, seq, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(
            cfg.num_attention_heads * cfg.head_dim, ("embed", "heads"), name="q_proj", use_bias=cfg.qkv_bias, **kw
        )(x)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv"), name="k_proj", use_bias=cfg.qkv_bias, **kw)(
            x
        )
        v = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv"), name="v_proj", use_bias=cfg.qkv_bias, **kw)(
            x
        )
        q = q.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        inv_freq = rope_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:  # decoding: write this step's keys and values at cache_index, attend to all
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0))
            cache = (k, v)
        out = dot_product_attention(q, k, v, allowed, self.attention).reshape(batch, seq, -1)
        out = dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", use_bias=cfg.o_bias, **kw)(out)
        return out, cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=cfg.mlp_bias)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, positions, allowed, cache=None, cache_index=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        attended, cache = LlamaAttention(cfg, name="self_attn", attention=self.attention, **kw)(
            h, positions, allowed, cache, cache_index
        )
        x = x + attended
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        return x + LlamaMLP(cfg, name="mlp", **kw)(h), cache


# Activation rematerialisation of the decoder layers (long sequences): "none" keeps every
# activation; "full" keeps only each layer's input and recomputes the rest in the backward pass;
# "dots" also keeps the matmul outputs (less recomputation, more memory).
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LlamaForCausalLM(nn.Module):
    """Causal LM: token ids (batch, seq) -> logits (batch, seq, vocab).

    With ``cache`` (from ``init_cache``) it decodes incrementally: the ``seq`` new tokens are
    written to the key/value cache at slot ``cache_index``, ``attention_mask`` covers all cache
    slots (batch, cache length), and the call returns ``(logits, cache)``.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32  # compute dtype (e.g. bfloat16)
    param_dtype: Any = jnp.float32
    remat: str = "none"  # training: recompute each layer in the backward pass ("full" or "dots"; see REMAT)
    scan_layers: bool = False  # one nn.scan over stacked decoder layers (params under "layers", see stacking)
    attention: str = "auto"  # recompute | xla | cudnn | splash | auto (layers.ATTENTIONS, resolve_attention)

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ConfigError(f"remat: expected one of {sorted(REMAT)}; got {self.remat!r}")
        check_attention(self.attention)
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=0):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(seq) + cache_index, (batch, seq))
        keys = seq if cache is None else cache[0][0].shape[1]
        allowed = layers.attention_mask(
            seq, keys, attention_mask, causal=True, sliding_window=cfg.sliding_window, query_offset=cache_index
        )
        embedding = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="embed_tokens", **kw)
        x = embedding(input_ids)
        layer_cls = LlamaDecoderLayer
        if REMAT[self.remat] is not None and cache is None:
            layer_cls = nn.remat(LlamaDecoderLayer, policy=REMAT[self.remat], prevent_cse=not self.scan_layers)
        if self.scan_layers:
            x, new_cache = self._scanned(layer_cls, x, position_ids, allowed, cache, cache_index)
        else:
            new_cache = []
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if cache is None else cache[i]
                x, layer_cache = layer_cls(cfg, name=f"layers_{i}", attention=self.attention, **kw)(
                    x, position_ids, allowed, layer_cache, cache_index
                )
                new_cache.append(layer_cache)
        x = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(x)
        if cfg.tie_word_embeddings:
            logits = embedding.attend(x)
        else:
            logits = dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, **kw)(x)
        return logits if cache is None else (logits, new_cache)

    def _scanned(self, layer_cls, x, positions, allowed, cache, cache_index):
        """The decoder layers as one ``nn.scan``: every variable collection (params, and the adapters
        ``dj.inject`` passes) sliced per layer, every PRNG stream split per layer. A key/value cache
        is carried as stacked (batch, layers, ...) arrays, so that beam search reorders its first axis;
        an ``init_cache`` list is stacked on the first call."""
        if cache is not None and isinstance(cache, list):
            cache = tuple(jnp.stack([layer[j] for layer in cache], axis=1) for j in range(2))
        scan = nn.scan(
            layer_cls,
            variable_axes={True: 0},  # every collection: params, and e.g. dj.inject's adapters
            split_rngs={True: True},  # every stream: one dropout mask per layer
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast if cache is None else 1, nn.broadcast),
            out_axes=1,
            length=self.config.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        layers = scan(
            self.config, name=LAYERS, dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention
        )
        return layers(x, positions, allowed, cache, cache_index)


def init_cache(
    config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32
) -> list[tuple[jax.Array, jax.Array]]:
    """An empty key/value cache of ``length`` slots: one (keys, values) pair per layer."""
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]


# Flax module path (regex) -> HF module name; leaves map kernel->weight (transposed), scale->weight.
HF_MODULES = (
    (r"embed_tokens", "model.embed_tokens"),
    (r"layers_(\d+)/(self_attn|mlp)/(\w+_proj)", r"model.layers.\1.\2.\3"),
    (r"layers_(\d+)/(input_layernorm|post_attention_layernorm)", r"model.layers.\1.\2"),
    (r"norm", "model.norm"),
    (r"lm_head", "lm_head"),
)
