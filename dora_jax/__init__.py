"""dora_jax: DoRA, LoRA and rsLoRA as functional transforms over Flax parameter trees."""

from dora_jax import core, errors, io, metrics, models, nnx, optim, targets
from dora_jax.core import AdapterConfig, decompose, init_adapters, merge
from dora_jax.errors import ConfigError, DoraError, InjectError, ShapeError, TargetError
from dora_jax.inject import inject, merged_targets
from dora_jax.inject_fn import inject_fn
from dora_jax.optim import combine, masked, partition, trainable_mask

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DoraError",
    "InjectError",
    "ShapeError",
    "TargetError",
    "combine",
    "core",
    "decompose",
    "errors",
    "init_adapters",
    "inject",
    "inject_fn",
    "io",
    "masked",
    "merge",
    "merged_targets",
    "metrics",
    "models",
    "nnx",
    "optim",
    "partition",
    "targets",
    "trainable_mask",
]
