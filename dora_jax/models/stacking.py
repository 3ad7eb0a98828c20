"""Stacked decoder layers: the ``layers`` subtree of a scanned model and the ``layers_{i}`` it stands for.

A Llama built with ``scan_layers=True`` holds its decoder layers as one subtree ``layers`` whose
leaves carry a leading axis of length ``num_hidden_layers`` (``nn.scan``); the unrolled model holds
``layers_0`` ... ``layers_{n-1}``. Params, adapters and optimizer state convert with the same two
functions, at the top level of a dict tree; HF and PEFT files always use the unrolled names.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax.errors import ShapeError

LAYERS = "layers"  # the stacked subtree's key, and the logical axis name of its leading axis
_LAYER = re.compile(rf"{LAYERS}_(\d+)")


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` holds a stacked ``layers`` subtree at its top level."""
    return isinstance(tree, dict) and LAYERS in tree


def stack_layers(tree: Any) -> Any:
    """``tree`` with ``layers_0`` ... ``layers_{n-1}`` replaced by ``layers`` (leaves stacked along a new
    leading axis); a tree that has no ``layers_{i}`` keys is returned as it is."""
    if not isinstance(tree, dict):
        return tree
    indices = sorted(int(m.group(1)) for key in tree if (m := _LAYER.fullmatch(str(key))))
    if not indices:
        return tree
    if indices != list(range(len(indices))):
        raise ShapeError(f"layers to stack must be layers_0 ... layers_{len(indices) - 1}; got indices {indices}")
    layers = [tree[f"{LAYERS}_{i}"] for i in indices]
    structures = {jax.tree.structure(layer) for layer in layers}
    if len(structures) > 1:
        raise ShapeError(
            f"layers_0 ... layers_{len(indices) - 1} differ in structure and cannot be stacked (adapters on some "
            "layers only, e.g. PEFT's layers_to_transform?): a scanned model adapts every layer alike"
        )
    rest = {key: value for key, value in tree.items() if not _LAYER.fullmatch(str(key))}
    return {**rest, LAYERS: jax.tree.map(_stack, *layers)}


def _stack(*leaves: Any) -> Any:
    if isinstance(leaves[0], jax.ShapeDtypeStruct):  # abstract trees (shapes only) stack as shapes
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack(leaves)


def _layer(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def unstack_layers(tree: Any) -> Any:
    """The inverse of ``stack_layers``: ``layers`` split along its leading axis into ``layers_{i}``
    (slices of the stacked leaves); a tree without a ``layers`` key is returned as it is."""
    if not is_stacked(tree):
        return tree
    stacked = tree[LAYERS]
    leaves = jax.tree.leaves(stacked)
    count = leaves[0].shape[0] if leaves else 0
    rest = {key: value for key, value in tree.items() if key != LAYERS}
    return {**rest, **{f"{LAYERS}_{i}": jax.tree.map(lambda leaf, i=i: _layer(leaf, i), stacked) for i in range(count)}}
