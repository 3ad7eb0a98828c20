"""PEFT adapter directories in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

The format is the one peft 0.21 writes for LoRA and for ``use_dora=True``: tensors
``base_model.model.<hf module>.lora_A.weight`` (r, d_in), ``.lora_B.weight`` (d_out, r) and
``.lora_magnitude_vector`` (d_out,), so ``A = lora_A.weightᵀ``, ``B = lora_B.weightᵀ``,
``m = lora_magnitude_vector``. HF module names come from the model zoo's tables.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dora_jax import models, targets
from dora_jax.core import AdapterConfig, adapter_entries
from dora_jax.errors import ConfigError, ShapeError, TargetError
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUFFIXES = {"a": ".lora_A.weight", "b": ".lora_B.weight", "m": ".lora_magnitude_vector"}
HEAD_MODULES = ("classifier", "score")  # modules_to_save that name a sequence classifier's head
# A sequence classifier's head as PEFT saves it (``modules_to_save``, task_type SEQ_CLS): Flax leaf -> key.
HEAD_KEYS = {"kernel": PREFIX + "classifier.weight", "bias": PREFIX + "classifier.bias"}
# PEFT options that change the model in ways an AdapterConfig cannot express: (key, allowed values).
UNSUPPORTED = (
    ("fan_in_fan_out", (False, None)),
    ("bias", ("none", None)),
    ("lora_bias", (False, None)),
    ("rank_pattern", ({}, None)),
    ("alpha_pattern", ({}, None)),
    ("layers_to_transform", (None,)),
    ("layer_replication", (None,)),
    ("trainable_token_indices", (None,)),
    ("target_parameters", (None, [])),
    ("use_qalora", (False, None)),
)


def _kernel_modules(model: Any) -> dict[str, str]:
    """Flax kernel path -> HF module name, for every 2-D kernel of a zoo model."""
    table = models.hf_table(model)
    out = {}
    for path, leaf in targets.leaves_by_path(models.abstract_params(model)).items():
        if path.endswith("/kernel") and len(leaf.shape) == 2:
            out[path] = models.hf_tensor(path, table)[0].removesuffix(".weight")
    return out


def _module_names(adapted: list[str], kernels: dict[str, str]) -> list[str] | None:
    """The module names (``q_proj`` ...) whose kernels are exactly the adapted ones, if such a set exists."""
    names = sorted({path.split("/")[-2] for path in adapted})
    return names if {p for p in kernels if p.split("/")[-2] in names} == set(adapted) else None


def _target_modules(adapted: list[str], kernels: dict[str, str]) -> list[str] | str:
    """PEFT target_modules: module names when they select exactly the adapted set, else a full-match regex."""
    return _module_names(adapted, kernels) or "|".join(re.escape(kernels[p]) for p in adapted)


def _targets(adapted: list[str], kernels: dict[str, str]) -> str:
    """AdapterConfig.targets selecting exactly the adapted kernels, as short as it can be."""
    names = _module_names(adapted, kernels)
    if names:
        return rf".*/({'|'.join(names)})/kernel"
    return "|".join(re.escape(p) for p in adapted)


def export_peft(
    adapters: Any,
    cfg: AdapterConfig,
    out_dir: str | pathlib.Path,
    *,
    model: Any,
    base_model_name_or_path: str | None = None,
    head: Any = None,
) -> pathlib.Path:
    """Writes ``adapters`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    ``head``: the trained ``classifier`` params of a sequence classifier, saved as PEFT saves
    ``modules_to_save`` (``base_model.model.classifier.weight`` / ``.bias``).
    """
    kernels = _kernel_modules(model)
    entries = adapter_entries(adapters)
    tensors: dict[str, np.ndarray] = {}
    for path, adapter in entries.items():
        if path not in kernels:
            raise TargetError(
                f"adapter for {path!r} names no 2-D kernel of {type(model).__name__}; its kernels:\n"
                + "\n".join(f"  {p}" for p in kernels)
            )
        key = PREFIX + kernels[path]
        tensors[key + SUFFIXES["a"]] = np.ascontiguousarray(np.asarray(adapter["a"]).T)
        tensors[key + SUFFIXES["b"]] = np.ascontiguousarray(np.asarray(adapter["b"]).T)
        if cfg.method == "dora":
            tensors[key + SUFFIXES["m"]] = np.asarray(adapter["m"])
    if head is not None:
        tensors[HEAD_KEYS["kernel"]] = np.ascontiguousarray(np.asarray(head["kernel"]).T)
        tensors[HEAD_KEYS["bias"]] = np.asarray(head["bias"])
    config = {
        "peft_type": "LORA",
        "task_type": models.family(model).peft_task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_dora": cfg.method == "dora",
        "use_rslora": cfg.rslora,
        "target_modules": _target_modules(list(entries), kernels),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True if cfg.init == "kaiming_uniform" else "gaussian",
        "modules_to_save": None if head is None else [models.family(model).head],
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".partial-") as tmp:
        save_file(tensors, pathlib.Path(tmp) / WEIGHTS_FILE, metadata={"format": "pt"})
        (pathlib.Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(pathlib.Path(tmp) / name, out_dir / name)
    return out_dir


def read_adapter_config(in_dir: pathlib.Path) -> dict[str, Any]:
    path = in_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; a PEFT adapter directory needs {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; supported: ['LORA']")
    saved = config.get("modules_to_save") or []
    if not set(saved) <= set(HEAD_MODULES):  # PEFT's SEQ_CLS default is ["classifier", "score"]
        raise ConfigError(
            f"{path}: modules_to_save={saved!r} is not supported (supported: a classifier head, "
            f"{list(HEAD_MODULES)}); importing would silently change the model"
        )
    for key, allowed in UNSUPPORTED:
        if config.get(key) not in allowed:
            raise ConfigError(
                f"{path}: {key}={config[key]!r} is not supported (supported: {allowed[0]!r}); "
                "importing would silently change the model"
            )
    return config


def _open(in_dir: pathlib.Path) -> tuple[dict[str, Any], SafetensorsDirectory]:
    """The checked adapter config and the tensors of a PEFT adapter directory."""
    config = read_adapter_config(in_dir)
    if not (in_dir / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{in_dir / WEIGHTS_FILE}: no such file (.bin adapters are not read)")
    return config, SafetensorsDirectory(in_dir)


def _saves_head(config: dict[str, Any]) -> bool:
    """Whether an adapter directory may hold a classifier head (PEFT SEQ_CLS or modules_to_save)."""
    return config.get("task_type") == "SEQ_CLS" or bool(config.get("modules_to_save"))


def read_peft_head(in_dir: str | pathlib.Path) -> dict[str, jnp.ndarray] | None:
    """The classifier head a SEQ_CLS adapter saves (``{"kernel": (d, labels), "bias": (labels,)}``), or None.

    ``import_peft`` returns the adapters only; a sequence classifier also needs this head
    (``dj.io.load_hf(base, num_labels=...)`` then ``{**params, "classifier": head}``).
    """
    in_dir = pathlib.Path(in_dir)
    config, tensors = _open(in_dir)
    names = set(tensors.names())
    present = [key for key in HEAD_KEYS.values() if key in names]
    if not present or not _saves_head(config):
        return None
    if len(present) < len(HEAD_KEYS):
        missing = sorted(set(HEAD_KEYS.values()) - set(present))
        raise CheckpointError(f"{in_dir / WEIGHTS_FILE}: the classifier head lacks {missing}")
    kernel, bias = (np.array(tensors.get(HEAD_KEYS[leaf])) for leaf in ("kernel", "bias"))
    if kernel.ndim != 2 or bias.shape != kernel.shape[:1]:
        raise ShapeError(
            f"{in_dir / WEIGHTS_FILE}: classifier weight {kernel.shape} and bias {bias.shape} are not a "
            "(labels, hidden) matrix and its (labels,) bias"
        )
    return {"kernel": jnp.asarray(kernel.T), "bias": jnp.asarray(bias)}


def import_peft(in_dir: str | pathlib.Path, params: Any, *, model: Any) -> tuple[dict[str, Any], AdapterConfig]:
    """(adapters, AdapterConfig) from a PEFT adapter directory (ours or PEFT's) for a zoo model.

    A SEQ_CLS adapter's classifier head is not an adapter: ``read_peft_head`` reads it.
    """
    in_dir = pathlib.Path(in_dir)
    config, tensors = _open(in_dir)
    weights = in_dir / WEIGHTS_FILE
    kernels = _kernel_modules(model)
    paths = {hf: path for path, hf in kernels.items()}
    method = "dora" if config.get("use_dora") else "lora"
    parts = "abm" if method == "dora" else "ab"
    head_keys = set(HEAD_KEYS.values()) if _saves_head(config) else set()
    by_module: dict[str, dict[str, str]] = {}
    for key in tensors.names():
        if key in head_keys:
            continue
        part = next((p for p, suffix in SUFFIXES.items() if key.endswith(suffix)), None)
        module = key.removeprefix(PREFIX).removesuffix(SUFFIXES[part]) if part and key.startswith(PREFIX) else None
        if module not in paths:
            raise TargetError(
                f"{weights}: key {key!r} maps to no kernel of {type(model).__name__} "
                f"(expected {PREFIX}<hf module>{{{', '.join(SUFFIXES.values())}}} for a 2-D kernel)"
            )
        if part not in parts:
            raise ConfigError(f"{in_dir / CONFIG_FILE}: use_dora is false but {weights} holds DoRA magnitude {key!r}")
        by_module.setdefault(module, {})[part] = key
    if not by_module:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    leaves = targets.leaves_by_path(params)
    rank = int(config["r"])
    flat = {}
    for module, keys in by_module.items():
        missing = [PREFIX + module + SUFFIXES[p] for p in parts if p not in keys]
        if missing:
            raise CheckpointError(f"{weights}: module {module!r} lacks {missing}")
        d_in, d_out = leaves[paths[module]].shape
        expected = {"a": (rank, d_in), "b": (d_out, rank), "m": (d_out,)}
        for part, key in keys.items():
            if tensors.shape(key) != expected[part]:
                raise ShapeError(
                    f"{weights}: {key!r} has shape {tensors.shape(key)}; r={rank} and the kernel "
                    f"{paths[module]!r} of shape {(d_in, d_out)} need {expected[part]}"
                )
        flat[paths[module]] = {p: jnp.asarray(np.array(tensors.get(k)).T) for p, k in keys.items()}
    cfg = AdapterConfig(
        method=method,
        rank=rank,
        alpha=float(config["lora_alpha"]),
        targets=_targets(list(flat), kernels),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora", False)),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming_uniform",
    )
    return targets.nest(flat), cfg
