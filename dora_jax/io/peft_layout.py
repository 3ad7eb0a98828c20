"""Where an adapter lives in a PEFT directory: file names, tensor keys, and the HF module names of a
zoo model's leaves, with the target patterns that select them both ways (PEFT's and ours)."""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dora_jax import models, targets
from dora_jax.errors import ConfigError, ShapeError, TargetError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUFFIXES = {"a": ".lora_A.weight", "b": ".lora_B.weight", "m": ".lora_magnitude_vector"}
# An embedding table's adapter (A: (r, vocab), B: (features, r) as PEFT stores them, no ".weight").
EMBEDDING_SUFFIXES = {"a": ".lora_embedding_A", "b": ".lora_embedding_B", "m": ".lora_magnitude_vector"}
SAVED_TABLE = ".base_layer.weight"  # PEFT saves a targeted embedding's own table next to its adapter
HEAD_MODULES = ("classifier", "score")  # modules_to_save that name a sequence classifier's head
# A sequence classifier's head as PEFT saves it (``modules_to_save``, task_type SEQ_CLS): Flax leaf -> key.
HEAD_KEYS = {"kernel": PREFIX + "classifier.weight", "bias": PREFIX + "classifier.bias"}
MAX_SPATIAL = 3  # PEFT adapts Conv1d, Conv2d and Conv3d


@dataclasses.dataclass(frozen=True)
class ModuleTable:
    """The adaptable leaves of a model: Flax leaf path -> PyTorch module name, and each leaf's shape.

    From a zoo model (every 2-D kernel and embedding table, named by its HF table) or from a mapping the
    user gives for any other model (``modules=``), whose leaves may also be convolution kernels.
    """

    names: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    owner: str  # what the names belong to, for errors
    zoo: bool  # names are complete (a zoo model's): PEFT's short module names select exactly the adapted set


def module_table(model: Any = None, modules: Mapping[str, str] | None = None, params: Any = None) -> ModuleTable:
    """The ``ModuleTable`` of a zoo ``model``, or of ``modules`` ({Flax leaf path: PyTorch module name})
    over ``params`` (arrays or shapes); exactly one of the two must be given."""
    if (model is None) == (modules is None):
        raise ConfigError("PEFT interop needs model= (a zoo model) or modules= ({Flax leaf path: PyTorch module name})")
    if model is not None:
        table = models.hf_table(model)
        names, shapes = {}, {}
        for path, leaf in targets.leaves_by_path(models.unrolled(model, models.abstract_params(model))).items():
            if path.endswith(("/kernel", "/embedding")) and len(leaf.shape) == 2:
                names[path] = models.hf_tensor(path, table)[0].removesuffix(".weight")
                shapes[path] = tuple(leaf.shape)
        return ModuleTable(names, shapes, type(model).__name__, zoo=True)
    if params is None:
        raise ConfigError("modules= needs params= (the base parameters, or their shapes) to know each kernel's shape")
    leaves = targets.leaves_by_path(params)
    unknown = sorted(set(modules) - set(leaves))
    if unknown:
        raise TargetError(
            f"modules= names {unknown}, no leaves of the parameter tree. Available leaves:\n" + targets.describe(params)
        )
    repeated = sorted(name for name, count in collections.Counter(modules.values()).items() if count > 1)
    if repeated:
        raise ConfigError(f"modules= maps several leaves to the PyTorch modules {repeated}")
    shapes = {path: tuple(leaves[path].shape) for path in modules}
    for path, shape in shapes.items():
        embedding = path.endswith("/embedding")
        if len(shape) < 2 or (embedding and len(shape) != 2) or len(shape) > 2 + MAX_SPATIAL:
            raise ShapeError(
                f"modules=: {path!r} of shape {shape} is no Linear weight (a 2-D kernel), Embedding table (2-D, "
                f"path ending in '/embedding') or Conv1d-3d kernel (window, c_in, c_out) that PEFT adapts"
            )
    return ModuleTable(dict(modules), shapes, "the modules mapping", zoo=False)


def is_conv(shape: tuple[int, ...]) -> bool:
    """A kernel of more than two axes in a ModuleTable is a convolution's (*window, c_in, c_out)."""
    return len(shape) > 2


def peft_shapes(shape: tuple[int, ...], rank: int, embedding: bool = False) -> dict[str, tuple[int, ...]]:
    """PEFT's shapes of lora_A, lora_B and the magnitude for a kernel of Flax ``shape``: a Linear's
    (r, d_in), (d_out, r), (d_out,); a ConvNd's (r, c_in, *window), (c_out, r, 1, ...), (1, c_out, 1, ...);
    an Embedding's (r, vocab), (features, r), (features,)."""
    if not is_conv(shape) or embedding:
        return {"a": (rank, shape[0]), "b": (shape[1], rank), "m": (shape[1],)}
    window, ones = shape[:-2], (1,) * (len(shape) - 2)
    return {"a": (rank, shape[-2], *window), "b": (shape[-1], rank, *ones), "m": (1, shape[-1], *ones)}


def to_peft(part: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An adapter tensor of a kernel of Flax ``shape`` in PEFT's layout (``peft_shapes``)."""
    array = np.asarray(array)
    if part == "m" or not is_conv(shape):
        return array.reshape(peft_shapes(shape, 1)["m"]) if part == "m" else np.ascontiguousarray(array.T)
    if part == "a":  # (*window, c_in, r) -> (r, c_in, *window)
        return np.ascontiguousarray(np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(array.ndim - 2))))
    return np.ascontiguousarray(array.T).reshape(array.shape[1], array.shape[0], *(1,) * (len(shape) - 2))


def from_peft(part: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``to_peft``: PEFT's tensor as the Flax adapter's (A (*in, r), B (r, d_out), m (d_out,))."""
    if part == "m":
        return array.reshape(shape[-1])
    if not is_conv(shape):
        return array.T
    if part == "a":  # (r, c_in, *window) -> (*window, c_in, r)
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    return array.reshape(array.shape[0], array.shape[1]).T


def input_axes_of(adapted: list[str], table: ModuleTable) -> dict[str, tuple[int, ...]]:
    """``AdapterConfig.input_axes`` for the convolution kernels among ``adapted``: all axes but the last."""
    return {re.escape(p): tuple(range(len(table.shapes[p]) - 1)) for p in adapted if is_conv(table.shapes[p])}


def suffixes_of(path: str) -> dict[str, str]:
    """The PEFT tensor suffixes of the adapter of the leaf at ``path`` (a Linear's or an Embedding's)."""
    return EMBEDDING_SUFFIXES if path.endswith("/embedding") else SUFFIXES


def module_names(adapted: list[str], table: ModuleTable) -> list[str] | None:
    """The module names (``q_proj`` ...) whose kernels are exactly the adapted ones, if such a set exists
    (a zoo model only: a mapping need not list every module of the PyTorch model)."""
    if not table.zoo:
        return None
    names = sorted({path.split("/")[-2] for path in adapted})
    return names if {p for p in table.names if p.split("/")[-2] in names} == set(adapted) else None


def target_modules(adapted: list[str], table: ModuleTable) -> list[str] | str:
    """PEFT target_modules: module names when they select exactly the adapted set, else a full-match regex."""
    return module_names(adapted, table) or "|".join(re.escape(table.names[p]) for p in adapted)


def rank_patterns(adapted: list[str], table: ModuleTable) -> list[str]:
    """PEFT rank_pattern keys selecting exactly the adapted modules (PEFT matches ``(.*\\.)?(key)$``)."""
    if not adapted:
        return []
    return module_names(adapted, table) or [re.escape(table.names[p]) for p in adapted]


def pattern_of(module: str, rank_pattern: dict[str, Any]) -> str | None:
    """The rank_pattern key PEFT applies to ``module`` (the first whose ``(.*\\.)?(key)$`` matches), if any."""
    return next((key for key in rank_pattern if re.match(rf"(.*\.)?({key})$", module)), None)


def targets_of(adapted: list[str], table: ModuleTable) -> str:
    """AdapterConfig.targets selecting exactly the adapted kernels, as short as it can be."""
    names = module_names(adapted, table)
    if names:
        leaves = sorted({path.rpartition("/")[2] for path in adapted})  # kernel, embedding or both
        leaf = leaves[0] if len(leaves) == 1 else f"({'|'.join(leaves)})"
        top_level = any("/" not in path.rpartition("/")[0] for path in adapted)  # e.g. Llama's embed_tokens
        return rf"{'(.*/)?' if top_level else '.*/'}({'|'.join(names)})/{leaf}"
    return "|".join(re.escape(p) for p in adapted)


def keys_by_module(
    keys: set[str], suffixes: list[tuple[str, str]], table: ModuleTable, weights: pathlib.Path
) -> dict[str, dict[str, str]]:
    """{HF module: {part: tensor key}} of an adapter file's ``keys`` (``suffixes``: (part, suffix) pairs);
    a key that maps to no kernel or table is named."""
    paths = {name: path for path, name in table.names.items()}
    by_module: dict[str, dict[str, str]] = {}
    lora_suffixes = {*SUFFIXES.values(), *EMBEDDING_SUFFIXES.values()}  # refused: a Linear's key on a table, or back
    for key in sorted(keys):
        part, suffix = next(((p, x) for p, x in suffixes if key.endswith(x)), (None, ""))
        module = key.removeprefix(PREFIX).removesuffix(suffix) if part and key.startswith(PREFIX) else None
        if module not in paths or (suffix in lora_suffixes and suffix not in suffixes_of(paths[module]).values()):
            raise TargetError(
                f"{weights}: key {key!r} maps to no kernel of {table.owner} (expected {PREFIX}<module>"
                f"{{{', '.join(dict.fromkeys(x for _, x in suffixes))}}} for a kernel or table it names)"
            )
        by_module.setdefault(module, {})[part] = key
    return by_module


def saves_head(config: dict[str, Any]) -> bool:
    """Whether an adapter directory may hold a classifier head (PEFT SEQ_CLS or modules_to_save)."""
    return config.get("task_type") == "SEQ_CLS" or bool(config.get("modules_to_save"))
