"""Which leaves of a parameter tree are adapted: regular expressions over '/'-joined key paths.

A leaf path is the '/'-joined key path of a params dict, e.g.
``encoder/layer_0/attention/query/kernel``. A pattern selects the leaves it matches in full
(``re.fullmatch``). This module is pure: no Flax, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from dora_jax.errors import TargetError


def key_name(key: Any) -> str:
    """The text of one key-path entry (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Iterable[Any]) -> str:
    """'/'-joined path of a JAX key path, e.g. ``encoder/layer_0/query/kernel``. A final ``.value``
    attribute (a Flax NNX ``Variable``'s payload) is left out: the path names the variable, so an
    ``nnx.State`` and its ``nnx.to_pure_dict`` have the same paths."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(key_name(k) for k in keys)


# Pytree node types that stand for one parameter (core.quantize's QuantizedKernel: codes and scales of
# one kernel), registered by the module that defines them: a path names the kernel, not its parts.
_PARAMETER_NODES: list[type] = []


def register_parameter_node(cls: type) -> type:
    """Makes nodes of ``cls`` single leaves for ``leaves_by_path`` and ``is_parameter_node``."""
    _PARAMETER_NODES.append(cls)
    return cls


def is_parameter_node(node: Any) -> bool:
    return isinstance(node, tuple(_PARAMETER_NODES))


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """All leaves of ``tree`` keyed by their '/'-joined path, in tree order (a registered parameter
    node, e.g. a quantized kernel, is one leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_parameter_node)
    return {path_str(kp): leaf for kp, leaf in flat}


def describe(tree: Any) -> str:
    """One line per leaf path with its shape; paths that differ only in numbers are grouped.

    Used in error messages so that a 32-layer model lists its leaves in a screenful.
    """
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for path, leaf in leaves_by_path(tree).items():
        groups.setdefault(re.sub(r"\d+", "*", path), []).append((path, tuple(getattr(leaf, "shape", ()))))
    lines = []
    for template, members in groups.items():
        if len(members) == 1:
            lines.append(f"  {members[0][0]} {members[0][1]}")
        else:
            lines.append(f"  {template} (x{len(members)}) {members[0][1]}")
    return "\n".join(lines)


def as_patterns(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Normalises a single regex or a sequence of regexes to a tuple."""
    return (targets,) if isinstance(targets, str) else tuple(targets)


def select(tree: Any, targets: str | Iterable[str]) -> dict[str, Any]:
    """The leaves whose path fully matches any of ``targets``, keyed by path, in tree order.

    Raises TargetError naming the pattern and listing the available leaf paths when a pattern
    matches nothing: a typo in a target must not silently train nothing.
    """
    patterns = as_patterns(targets)
    leaves = leaves_by_path(tree)
    compiled = [re.compile(p) for p in patterns]
    for pattern, regex in zip(patterns, compiled, strict=True):
        if not any(regex.fullmatch(path) for path in leaves):
            raise TargetError(
                f"target pattern {pattern!r} matches no leaf of the parameter tree "
                f"(patterns match the whole '/'-joined path). Available leaves:\n{describe(tree)}"
            )
    return {path: leaf for path, leaf in leaves.items() if any(r.fullmatch(path) for r in compiled)}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from a mapping of '/'-joined paths to values (the inverse of flattening)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out
