"""Flax model zoo with logical axis names: Llama family and BERT family. Nothing DoRA-specific.

``from_hf_config`` builds a module from an HF ``config.json`` dict; ``hf_table`` and
``hf_config`` give what export needs to write it back.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dora_jax.errors import ConfigError
from dora_jax.models import bert, llama
from dora_jax.models.bert import BertConfig, BertForSequenceClassification, BertModel
from dora_jax.models.families import FAMILIES, Family, family
from dora_jax.models.hf_names import Table, hf_module, hf_tensor
from dora_jax.models.llama import LlamaConfig, LlamaForCausalLM
from dora_jax.models.stacking import LAYERS, stack_layers, unstack_layers

SUPPORTED_MODEL_TYPES = llama.MODEL_TYPES + bert.MODEL_TYPES


def from_hf_config(
    hf: dict[str, Any],
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
    scan_layers: bool = False,
    attention: str = "auto",
) -> nn.Module:
    """The zoo module for an HF config dict; ``dtype`` is the compute dtype. Llama family: ``remat`` a
    key of llama.REMAT, ``scan_layers`` stacks the decoder layers under one ``nn.scan``, ``attention``
    an entry of layers.ATTENTIONS (BERT: the recomputing kernel)."""
    model_type = hf.get("model_type")
    if model_type in llama.MODEL_TYPES:
        return LlamaForCausalLM(
            LlamaConfig.from_hf(hf),
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scan_layers=scan_layers,
            attention=attention,
        )
    llama_only = {"remat": (remat, "none"), "scan_layers": (scan_layers, False), "attention": (attention, "auto")}
    for name, (value, default) in llama_only.items():
        if value != default:
            raise ConfigError(f"{name}={value!r} is supported for the Llama family, not model_type {model_type!r}")
    if model_type in bert.MODEL_TYPES:
        config = BertConfig.from_hf(hf)
        if "BertForSequenceClassification" in (hf.get("architectures") or []):
            if model_type != "bert":
                raise ConfigError(
                    f"sequence classification is supported for model_type 'bert' only, not {model_type!r}"
                )
            return BertForSequenceClassification(config, dtype=dtype, param_dtype=param_dtype)
        return BertModel(config, dtype=dtype, param_dtype=param_dtype)
    raise ConfigError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")


def hf_table(model: nn.Module) -> Table:
    """Flax module regex -> HF module name rules of a zoo model."""
    return family(model).hf_table


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The HF ``config.json`` dict of a zoo model, with its architecture named."""
    out = model.config.to_hf()
    record = family(model)
    if record.architecture is not None:
        out["architectures"] = [record.architecture(model.config)]
    if record.output == "labels":
        out.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(model.config.num_labels)})
    return out


def scans_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds its decoder layers stacked under ``layers`` (``scan_layers=True``)."""
    return bool(getattr(model, "scan_layers", False))


def unrolled(model: nn.Module, tree: Any) -> Any:
    """A params-shaped tree (params, adapters) of ``model`` in the unrolled layout HF and PEFT name:
    ``layers_{i}`` for a scanning model's stacked ``layers``; any other tree unchanged."""
    return unstack_layers(tree) if scans_layers(model) else tree


def in_layout(model: nn.Module, tree: Any) -> Any:
    """A params-shaped tree in the layout ``model`` applies: stacked ``layers`` for a scanning model."""
    return stack_layers(tree) if scans_layers(model) else tree


def dummy_inputs(model: nn.Module) -> tuple[jax.Array]:
    """Inputs that trace every parameter of a zoo model."""
    return (jnp.zeros((1, 1), jnp.int32),)


def boxed_shapes(model: nn.Module) -> Any:
    """Abstract params with their ``nn.Partitioned`` logical-axis boxes (no memory allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model))["params"]


def abstract_params(model: nn.Module) -> Any:
    """Shapes and dtypes of the (unboxed) params of a zoo model."""
    return nn.meta.unbox(boxed_shapes(model))


def logical_axes(model: nn.Module) -> Any:
    """A tree of ``PartitionSpec`` with logical axis names (embed, heads, kv, mlp, vocab, norm)."""
    return nn.get_partition_spec(boxed_shapes(model))


def is_base_kernel(model: nn.Module, path: str) -> bool:
    """Whether the unrolled params leaf ``path`` is one of the kernels a quantized base stores quantized
    (every linear kernel but the head's: ``Family.base_kernels``)."""
    return re.fullmatch(family(model).base_kernels, path) is not None


def init_params(model: nn.Module, rng: jax.Array) -> Any:
    """Randomly initialised (unboxed) params of a zoo model; a scanning model gets the unrolled
    model's, stacked, so that the layout does not change the weights a seed gives."""
    if scans_layers(model):
        return stack_layers(init_params(model.clone(scan_layers=False), rng))
    return nn.meta.unbox(model.init(rng, *dummy_inputs(model))["params"])


__all__ = [
    "FAMILIES",
    "LAYERS",
    "SUPPORTED_MODEL_TYPES",
    "Family",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "abstract_params",
    "family",
    "from_hf_config",
    "hf_config",
    "hf_module",
    "hf_table",
    "hf_tensor",
    "in_layout",
    "init_params",
    "is_base_kernel",
    "logical_axes",
    "scans_layers",
    "stack_layers",
    "unrolled",
    "unstack_layers",
]
