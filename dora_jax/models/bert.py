"""BERT-family encoder (BERT, MiniLM, RoBERTa) in Flax linen, with HF parameter names.

``BertModel.apply({"params": p}, input_ids, attention_mask=mask)`` returns the last hidden
states (batch, seq, hidden); ``return_pooled=True`` adds the pooler output.
``BertForSequenceClassification`` adds dropout and a linear classifier on the pooled output.
Leaf paths read like ``encoder/layer_0/attention/query/kernel``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dora_jax.errors import ConfigError
from dora_jax.models.layers import activation, attention_bias, dense, dot_product_attention, embed, layer_norm

MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """The architecture numbers of a BERT-family checkpoint (read from and written to config.json)."""

    model_type: str = "bert"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_dropout_prob: float = 0.1
    num_labels: int = 2
    source: str = "{}"  # the config.json this came from, as JSON, so that export keeps every key

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a BERT-family type {MODEL_TYPES}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        activation(self.hidden_act)
        position_type = json.loads(self.source).get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(f"position_embedding_type {position_type!r} is not supported; supported: ['absolute']")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        model_type = hf.get("model_type", "bert")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "gelu"),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 1 if model_type == "roberta" else 0),
            hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
            num_labels=len(hf.get("id2label") or {0: 0, 1: 1}),
            source=json.dumps(hf, sort_keys=True),
        )

    def to_hf(self) -> dict[str, Any]:
        out = json.loads(self.source)
        out.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            hidden_dropout_prob=self.hidden_dropout_prob,
        )
        return out


def position_ids_for(config: BertConfig, input_ids: jax.Array) -> jax.Array:
    """BERT counts positions from 0; RoBERTa from pad_token_id + 1, skipping padding tokens."""
    if config.model_type == "roberta":
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), name="word_embeddings", **kw)(input_ids)
        x = x + embed(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"), name="position_embeddings", **kw)(
            position_ids
        )
        x = x + embed(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), name="token_type_embeddings", **kw)(
            token_type_ids
        )
        x = layer_norm(cfg.layer_norm_eps, name="LayerNorm", **kw)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertOutput(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .): HF's BertSelfOutput and BertOutput."""

    config: BertConfig
    axes: tuple[str, str] = ("heads", "embed")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(cfg.hidden_size, self.axes, name="dense", use_bias=True, **kw)(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return layer_norm(cfg.layer_norm_eps, name="LayerNorm", **kw)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, allowed, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = x.shape[:2] + (cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (
            dense(cfg.hidden_size, ("embed", "heads"), name=name, use_bias=True, **kw)(x).reshape(shape)
            for name in ("query", "key", "value")
        )
        attended = dot_product_attention(q, k, v, allowed).reshape(x.shape)
        return BertOutput(cfg, name="output", **kw)(attended, x, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = dense(
            cfg.intermediate_size,
            ("embed", "mlp"),
            name="dense",
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        return activation(cfg.hidden_act)(h)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, allowed, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertAttention(self.config, name="attention", **kw)(x, allowed, deterministic)
        h = BertIntermediate(self.config, name="intermediate", **kw)(x)
        return BertOutput(self.config, axes=("mlp", "embed"), name="output", **kw)(h, x, deterministic)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, allowed, deterministic=True):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}", dtype=self.dtype, param_dtype=self.param_dtype)(
                x, allowed, deterministic
            )
        return x


class BertPooler(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        first = hidden[:, 0]
        return jnp.tanh(
            dense(
                cfg.hidden_size,
                ("embed", None),
                name="dense",
                use_bias=True,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(first)
        )


class BertModel(nn.Module):
    """Encoder: token ids (batch, seq) -> last hidden states (batch, seq, hidden)."""

    config: BertConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        deterministic=True,
        return_pooled=False,
    ):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_for(cfg, input_ids)
        seq = input_ids.shape[1]
        allowed = attention_bias(seq, seq, attention_mask, causal=False)
        x = BertEmbeddings(cfg, name="embeddings", **kw)(input_ids, token_type_ids, position_ids, deterministic)
        hidden = BertEncoder(cfg, name="encoder", **kw)(x, allowed, deterministic)
        pooled = BertPooler(cfg, name="pooler", **kw)(hidden)  # unused outputs are dropped by XLA
        return (hidden, pooled) if return_pooled else hidden


class BertForSequenceClassification(nn.Module):
    """BERT with dropout and a linear classifier on the pooled output: ids -> logits (batch, labels)."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, pooled = BertModel(cfg, name="bert", **kw)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic, return_pooled=True
        )
        pooled = nn.Dropout(cfg.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return dense(cfg.num_labels, ("embed", None), name="classifier", use_bias=True, **kw)(pooled)


# Flax module path (regex) -> HF module name. "attention/self" is flattened to "attention".
_ENCODER_MODULES = (
    (r"embeddings/(\w+)", r"embeddings.\1"),
    (r"encoder/layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
    (r"encoder/layer_(\d+)/attention/output/(dense|LayerNorm)", r"encoder.layer.\1.attention.output.\2"),
    (r"encoder/layer_(\d+)/(intermediate|output)/(dense|LayerNorm)", r"encoder.layer.\1.\2.\3"),
    (r"pooler/dense", "pooler.dense"),
)


def hf_modules(classifier: bool) -> tuple[tuple[str, str], ...]:
    """The table of a bare encoder (HF names without prefix) or of a classifier (``bert.`` prefix)."""
    if not classifier:
        return _ENCODER_MODULES
    return tuple((f"bert/{pattern}", f"bert.{template}") for pattern, template in _ENCODER_MODULES) + (
        (r"classifier", "classifier"),
    )
