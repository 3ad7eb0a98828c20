"""Where an adapter lives in a PEFT directory: file names, tensor keys, and the HF module names of a
zoo model's leaves, with the target patterns that select them both ways (PEFT's and ours)."""

from __future__ import annotations

import pathlib
import re
from typing import Any

from dora_jax import models, targets
from dora_jax.errors import TargetError

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


def kernel_modules(model: Any) -> dict[str, str]:
    """Flax leaf path -> HF module name, for every 2-D kernel and embedding table of a zoo model."""
    table = models.hf_table(model)
    out = {}
    for path, leaf in targets.leaves_by_path(models.abstract_params(model)).items():
        if path.endswith(("/kernel", "/embedding")) and len(leaf.shape) == 2:
            out[path] = models.hf_tensor(path, table)[0].removesuffix(".weight")
    return out


def suffixes_of(path: str) -> dict[str, str]:
    """The PEFT tensor suffixes of the adapter of the leaf at ``path`` (a Linear's or an Embedding's)."""
    return EMBEDDING_SUFFIXES if path.endswith("/embedding") else SUFFIXES


def module_names(adapted: list[str], kernels: dict[str, str]) -> list[str] | None:
    """The module names (``q_proj`` ...) whose kernels are exactly the adapted ones, if such a set exists."""
    names = sorted({path.split("/")[-2] for path in adapted})
    return names if {p for p in kernels if p.split("/")[-2] in names} == set(adapted) else None


def target_modules(adapted: list[str], kernels: dict[str, str]) -> list[str] | str:
    """PEFT target_modules: module names when they select exactly the adapted set, else a full-match regex."""
    return module_names(adapted, kernels) or "|".join(re.escape(kernels[p]) for p in adapted)


def rank_patterns(adapted: list[str], kernels: dict[str, str]) -> list[str]:
    """PEFT rank_pattern keys selecting exactly the adapted modules (PEFT matches ``(.*\\.)?(key)$``)."""
    if not adapted:
        return []
    return module_names(adapted, kernels) or [re.escape(kernels[p]) for p in adapted]


def pattern_of(module: str, rank_pattern: dict[str, Any]) -> str | None:
    """The rank_pattern key PEFT applies to ``module`` (the first whose ``(.*\\.)?(key)$`` matches), if any."""
    return next((key for key in rank_pattern if re.match(rf"(.*\.)?({key})$", module)), None)


def targets_of(adapted: list[str], kernels: dict[str, str]) -> str:
    """AdapterConfig.targets selecting exactly the adapted kernels, as short as it can be."""
    names = module_names(adapted, kernels)
    if names:
        leaves = sorted({path.rpartition("/")[2] for path in adapted})  # kernel, embedding or both
        leaf = leaves[0] if len(leaves) == 1 else f"({'|'.join(leaves)})"
        top_level = any("/" not in path.rpartition("/")[0] for path in adapted)  # e.g. Llama's embed_tokens
        return rf"{'(.*/)?' if top_level else '.*/'}({'|'.join(names)})/{leaf}"
    return "|".join(re.escape(p) for p in adapted)


def keys_by_module(
    keys: set[str], suffixes: list[tuple[str, str]], paths: dict[str, str], weights: pathlib.Path, model: Any
) -> dict[str, dict[str, str]]:
    """{HF module: {part: tensor key}} of an adapter file's ``keys`` (``suffixes``: (part, suffix) pairs);
    a key that maps to no kernel or table is named."""
    by_module: dict[str, dict[str, str]] = {}
    lora_suffixes = {*SUFFIXES.values(), *EMBEDDING_SUFFIXES.values()}  # refused: a Linear's key on a table, or back
    for key in sorted(keys):
        part, suffix = next(((p, x) for p, x in suffixes if key.endswith(x)), (None, ""))
        module = key.removeprefix(PREFIX).removesuffix(suffix) if part and key.startswith(PREFIX) else None
        if module not in paths or (suffix in lora_suffixes and suffix not in suffixes_of(paths[module]).values()):
            raise TargetError(
                f"{weights}: key {key!r} maps to no kernel of {type(model).__name__} (expected "
                f"{PREFIX}<hf module>{{{', '.join(dict.fromkeys(x for _, x in suffixes))}}} for a 2-D kernel or table)"
            )
        by_module.setdefault(module, {})[part] = key
    return by_module


def saves_head(config: dict[str, Any]) -> bool:
    """Whether an adapter directory may hold a classifier head (PEFT SEQ_CLS or modules_to_save)."""
    return config.get("task_type") == "SEQ_CLS" or bool(config.get("modules_to_save"))
