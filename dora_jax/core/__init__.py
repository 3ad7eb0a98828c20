"""Pure DoRA/LoRA functions on arrays and pytrees: no Flax modules, no I/O, no global state."""

from dora_jax.core import conv, embed, quantize, vera
from dora_jax.core.adapters import (
    adapter_entries,
    check_adapter,
    check_projection,
    init_adapter,
    init_adapters,
    init_magnitude,
    is_adapter,
    matched_entries,
    merge,
)
from dora_jax.core.config import AdapterConfig
from dora_jax.core.dora import (
    NORM_EPS,
    KernelLayout,
    column_norm,
    decompose,
    factored_column_norm,
    factored_dense,
    folded_dense,
    kernel_layout,
    magnitude_dense,
    merge_kernel,
)

__all__ = [
    "NORM_EPS",
    "AdapterConfig",
    "KernelLayout",
    "adapter_entries",
    "check_adapter",
    "check_projection",
    "column_norm",
    "conv",
    "embed",
    "decompose",
    "factored_column_norm",
    "factored_dense",
    "folded_dense",
    "init_adapter",
    "init_adapters",
    "init_magnitude",
    "is_adapter",
    "kernel_layout",
    "magnitude_dense",
    "matched_entries",
    "merge",
    "merge_kernel",
    "quantize",
    "vera",
]
