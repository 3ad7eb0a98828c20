"""Mapping between Flax parameter paths and HF (PyTorch) tensor names, one table per family.

A table is a sequence of ``(flax module regex, HF module template)`` rules; the leaf name maps
as in ``LEAVES`` (a Flax kernel is the transpose of the PyTorch weight).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dora_jax.errors import TargetError

# Flax leaf name -> (HF leaf name, transposed?)
LEAVES = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "scale": ("weight", False),
    "embedding": ("weight", False),
}

Table = Sequence[tuple[str, str]]


def hf_module(flax_module: str, table: Table) -> str:
    """HF module name of a '/'-joined Flax module path, e.g. ``layers_0/self_attn/q_proj``."""
    for pattern, template in table:
        match = re.fullmatch(pattern, flax_module)
        if match:
            return match.expand(template)
    raise TargetError(f"Flax module {flax_module!r} has no HF name in this model family's table")


def hf_tensor(flax_path: str, table: Table) -> tuple[str, bool]:
    """HF tensor name of a Flax leaf path and whether the array is transposed between the two."""
    module, _, leaf = flax_path.rpartition("/")
    if leaf not in LEAVES:
        raise TargetError(f"Flax leaf {flax_path!r}: leaf name {leaf!r} is not one of {sorted(LEAVES)}")
    name, transposed = LEAVES[leaf]
    return f"{hf_module(module, table)}.{name}", transposed
