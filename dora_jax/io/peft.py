"""PEFT adapter directories in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

The format is the one peft 0.21 writes for LoRA and for ``use_dora=True``: tensors
``base_model.model.<hf module>.lora_A.weight`` (r, d_in), ``.lora_B.weight`` (d_out, r) and
``.lora_magnitude_vector`` (d_out,), so ``A = lora_A.weightᵀ``, ``B = lora_B.weightᵀ``,
``m = lora_magnitude_vector``. HF module names come from the model zoo's tables.

A magnitude-only module (``AdapterConfig.magnitude_targets``) has no PEFT form of its own: it is
written as a DoRA module of rank 1 (``rank_pattern``) whose ``lora_A`` and ``lora_B`` are zero,
which PEFT computes as exactly ``m * W0 / ||W0||_c``, and read back as magnitude-only.
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
from dora_jax.core import AdapterConfig, adapter_entries, matched_entries, vera
from dora_jax.errors import ConfigError, ShapeError, TargetError
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUFFIXES = {"a": ".lora_A.weight", "b": ".lora_B.weight", "m": ".lora_magnitude_vector"}
VERA_SUFFIXES = {"lambda_d": ".vera_lambda_d", "lambda_b": ".vera_lambda_b"}
VERA_PROJECTION_KEYS = {"shared_a": "base_model.vera_A", "shared_b": "base_model.vera_B"}
PEFT_TYPES = ("LORA", "VERA")
HEAD_MODULES = ("classifier", "score")  # modules_to_save that name a sequence classifier's head
# A sequence classifier's head as PEFT saves it (``modules_to_save``, task_type SEQ_CLS): Flax leaf -> key.
HEAD_KEYS = {"kernel": PREFIX + "classifier.weight", "bias": PREFIX + "classifier.bias"}
# PEFT options that change the model in ways an AdapterConfig cannot express: (key, allowed values).
UNSUPPORTED = (
    ("fan_in_fan_out", (False, None)),
    ("bias", ("none", None)),
    ("lora_bias", (False, None)),
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


def _rank_patterns(adapted: list[str], kernels: dict[str, str]) -> list[str]:
    """PEFT rank_pattern keys selecting exactly the adapted modules (PEFT matches ``(.*\\.)?(key)$``)."""
    if not adapted:
        return []
    return _module_names(adapted, kernels) or [re.escape(kernels[p]) for p in adapted]


def _pattern_of(module: str, rank_pattern: dict[str, Any]) -> str | None:
    """The rank_pattern key PEFT applies to ``module`` (the first whose ``(.*\\.)?(key)$`` matches), if any."""
    return next((key for key in rank_pattern if re.match(rf"(.*\.)?({key})$", module)), None)


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
    """Writes ``adapters`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads: a
    LoRA / DoRA adapter (``LoraConfig``) or a VeRA one (``VeraConfig`` with ``save_projection``).

    ``head``: the trained ``classifier`` params of a sequence classifier, saved as PEFT saves
    ``modules_to_save`` (``base_model.model.classifier.weight`` / ``.bias``). PEFT has no DVoRA:
    such adapters are refused (export the merged model instead).
    """
    if cfg.method == "dvora":
        raise ConfigError(
            "PEFT has no DVoRA (VeRA's update under DoRA's magnitude): export the merged model instead "
            "(python -m dora_jax.export --format=merged, or export.merged=True and export.peft=False in a run)"
        )
    kernels = _kernel_modules(model)
    entries = adapter_entries(adapters)
    for path in entries:
        if path not in kernels:
            raise TargetError(
                f"adapter for {path!r} names no 2-D kernel of {type(model).__name__}; its kernels:\n"
                + "\n".join(f"  {p}" for p in kernels)
            )
    write = _vera_tensors if cfg.vector_based else _lora_tensors
    tensors, config = write(adapters, entries, cfg, kernels, model)
    if head is not None:
        tensors[HEAD_KEYS["kernel"]] = np.ascontiguousarray(np.asarray(head["kernel"]).T)
        tensors[HEAD_KEYS["bias"]] = np.asarray(head["bias"])
    config.update(
        task_type=models.family(model).peft_task_type,
        base_model_name_or_path=base_model_name_or_path,
        r=cfg.rank,
        target_modules=_target_modules(list(entries), kernels),
        fan_in_fan_out=False,
        bias="none",
        modules_to_save=None if head is None else [models.family(model).head],
        inference_mode=True,
    )
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".partial-") as tmp:
        save_file(tensors, pathlib.Path(tmp) / WEIGHTS_FILE, metadata={"format": "pt"})
        (pathlib.Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(pathlib.Path(tmp) / name, out_dir / name)
    return out_dir


def _lora_tensors(adapters, entries, cfg, kernels, model) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A LoRA / DoRA adapter's tensors and ``LoraConfig`` fields; magnitude-only modules as rank-1 zero A, B."""
    tensors: dict[str, np.ndarray] = {}
    magnitude_only = [path for path, adapter in entries.items() if "a" not in adapter]
    shapes = targets.leaves_by_path(models.abstract_params(model)) if magnitude_only else {}
    for path, adapter in entries.items():
        key = PREFIX + kernels[path]
        if "a" not in adapter:  # rank 1, A = B = 0: PEFT's DoRA then computes m * W0 / ||W0||_c
            d_in, d_out = shapes[path].shape
            adapter = {"a": np.zeros((d_in, 1), np.float32), "b": np.zeros((1, d_out), np.float32), **adapter}
        tensors[key + SUFFIXES["a"]] = np.ascontiguousarray(np.asarray(adapter["a"]).T)
        tensors[key + SUFFIXES["b"]] = np.ascontiguousarray(np.asarray(adapter["b"]).T)
        if cfg.method == "dora":
            tensors[key + SUFFIXES["m"]] = np.asarray(adapter["m"])
    config = {
        "peft_type": "LORA",
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_dora": cfg.method == "dora",
        "use_rslora": cfg.rslora,
        "init_lora_weights": True if cfg.init == "kaiming_uniform" else "gaussian",
        "rank_pattern": {pattern: 1 for pattern in _rank_patterns(magnitude_only, kernels)},
        "alpha_pattern": {},
    }
    return tensors, config


def _vera_tensors(adapters, entries, cfg, kernels, model) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A VeRA adapter's tensors (vectors per module, the shared projections once) and ``VeraConfig`` fields."""
    tensors: dict[str, np.ndarray] = {}
    for path, adapter in entries.items():
        for part in ("lambda_d", "lambda_b"):
            tensors[PREFIX + kernels[path] + VERA_SUFFIXES[part]] = np.asarray(adapter[part])
    projection = vera.projection_of(adapters)
    for part, key in VERA_PROJECTION_KEYS.items():  # PyTorch layout: vera_A (r, d_in), vera_B (d_out, r)
        tensors[key] = np.ascontiguousarray(np.asarray(projection[part]).T)
    config = {
        "peft_type": "VERA",
        "projection_prng_key": cfg.projection_seed,
        "save_projection": True,  # PEFT draws its projections with torch's generator: they must travel
        "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return tensors, config


def read_adapter_config(in_dir: pathlib.Path) -> dict[str, Any]:
    path = in_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; a PEFT adapter directory needs {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if config.get("peft_type") not in PEFT_TYPES:
        raise ConfigError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported; supported: {list(PEFT_TYPES)}"
        )
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


def _by_module(
    keys: set[str], suffixes: dict[str, str], paths: dict[str, str], weights: pathlib.Path, model: Any
) -> dict[str, dict[str, str]]:
    """{HF module: {part: tensor key}} of an adapter file's ``keys``; a key that maps to no kernel is named."""
    by_module: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        part = next((p for p, suffix in suffixes.items() if key.endswith(suffix)), None)
        module = key.removeprefix(PREFIX).removesuffix(suffixes[part]) if part and key.startswith(PREFIX) else None
        if module not in paths:
            raise TargetError(
                f"{weights}: key {key!r} maps to no kernel of {type(model).__name__} "
                f"(expected {PREFIX}<hf module>{{{', '.join(suffixes.values())}}} for a 2-D kernel)"
            )
        by_module.setdefault(module, {})[part] = key
    return by_module


def import_peft(in_dir: str | pathlib.Path, params: Any, *, model: Any) -> tuple[dict[str, Any], AdapterConfig]:
    """(adapters, AdapterConfig) from a PEFT adapter directory (ours or PEFT's) for a zoo model.

    A SEQ_CLS adapter's classifier head is not an adapter: ``read_peft_head`` reads it.
    """
    in_dir = pathlib.Path(in_dir)
    config, tensors = _open(in_dir)
    if config["peft_type"] == "VERA":
        return _import_vera(in_dir, config, tensors, params, model)
    weights = in_dir / WEIGHTS_FILE
    kernels = _kernel_modules(model)
    paths = {hf: path for path, hf in kernels.items()}
    method = "dora" if config.get("use_dora") else "lora"
    parts = "abm" if method == "dora" else "ab"
    head_keys = set(HEAD_KEYS.values()) if _saves_head(config) else set()
    by_module = _by_module(set(tensors.names()) - head_keys, SUFFIXES, paths, weights, model)
    for keys in by_module.values():
        if "m" in keys and "m" not in parts:
            raise ConfigError(
                f"{in_dir / CONFIG_FILE}: use_dora is false but {weights} holds DoRA magnitude {keys['m']!r}"
            )
    if not by_module:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    leaves = targets.leaves_by_path(params)
    rank_pattern = config.get("rank_pattern") or {}
    flat, magnitudes = {}, {}
    for module, keys in by_module.items():
        missing = [PREFIX + module + SUFFIXES[p] for p in parts if p not in keys]
        if missing:
            raise CheckpointError(f"{weights}: module {module!r} lacks {missing}")
        pattern = _pattern_of(module, rank_pattern)
        # A module with a rank of its own is read only as export_peft writes a magnitude-only one.
        if pattern is not None and (method != "dora" or any(np.any(tensors.get(keys[p])) for p in "ab")):
            raise ConfigError(
                f"{in_dir / CONFIG_FILE}: rank_pattern {{{pattern!r}: {rank_pattern[pattern]}}} gives module "
                f"{module!r} a rank of its own, which is supported only for a DoRA module whose lora_A and lora_B "
                "are zero (a magnitude-only module, as dora_jax exports it)"
            )
        rank = int(config["r"] if pattern is None else rank_pattern[pattern])
        d_in, d_out = leaves[paths[module]].shape
        expected = {"a": (rank, d_in), "b": (d_out, rank), "m": (d_out,)}
        for part, key in keys.items():
            if tensors.shape(key) != expected[part]:
                raise ShapeError(
                    f"{weights}: {key!r} has shape {tensors.shape(key)}; r={rank} and the kernel "
                    f"{paths[module]!r} of shape {(d_in, d_out)} need {expected[part]}"
                )
        arrays = {p: jnp.asarray(np.array(tensors.get(k)).T) for p, k in keys.items()}
        if pattern is None:
            flat[paths[module]] = arrays
        else:
            magnitudes[paths[module]] = {"m": arrays["m"]}
    if not flat:
        raise ConfigError(f"{weights}: every module is magnitude-only; at least one needs lora_A and lora_B")
    cfg = AdapterConfig(
        method=method,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        targets=_targets(list(flat), kernels),
        magnitude_targets=_targets(list(magnitudes), kernels) if magnitudes else "",
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora", False)),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming_uniform",
    )
    return targets.nest({**flat, **magnitudes}), cfg


def _import_vera(
    in_dir: pathlib.Path, config: dict[str, Any], tensors: SafetensorsDirectory, params: Any, model: Any
) -> tuple[dict[str, Any], AdapterConfig]:
    """A PEFT VeRA adapter: the vectors of each module and the shared projections it saved."""
    weights = in_dir / WEIGHTS_FILE
    names = set(tensors.names())
    missing = [key for key in VERA_PROJECTION_KEYS.values() if key not in names]
    if missing or not config.get("save_projection", True):
        raise ConfigError(
            f"{in_dir}: a VeRA adapter without its projections ({missing or 'save_projection=false'}): PEFT draws "
            "them with torch's generator from projection_prng_key, which JAX does not reproduce; save the "
            "adapter with VeraConfig(save_projection=True)"
        )
    kernels = _kernel_modules(model)
    paths = {hf: path for path, hf in kernels.items()}
    head_keys = set(HEAD_KEYS.values()) if _saves_head(config) else set()
    keys = names - head_keys - set(VERA_PROJECTION_KEYS.values())
    by_module = _by_module(keys, VERA_SUFFIXES, paths, weights, model)
    if not by_module:
        raise CheckpointError(f"{weights}: holds no VeRA vectors")
    rank, leaves, flat = int(config["r"]), targets.leaves_by_path(params), {}
    for module, keys in by_module.items():
        lacking = [PREFIX + module + VERA_SUFFIXES[p] for p in VERA_SUFFIXES if p not in keys]
        if lacking:
            raise CheckpointError(f"{weights}: module {module!r} lacks {lacking}")
        d_out = leaves[paths[module]].shape[1]
        for part, shape in (("lambda_d", (rank,)), ("lambda_b", (d_out,))):
            if tensors.shape(keys[part]) != shape:
                raise ShapeError(
                    f"{weights}: {keys[part]!r} has shape {tensors.shape(keys[part])}; r={rank} and the kernel "
                    f"{paths[module]!r} of shape {tuple(leaves[paths[module]].shape)} need {shape}"
                )
        flat[paths[module]] = {p: jnp.asarray(np.array(tensors.get(k))) for p, k in keys.items()}
    adapters = targets.nest(flat)
    adapters[vera.PROJECTION] = {p: jnp.asarray(np.array(tensors.get(k)).T) for p, k in VERA_PROJECTION_KEYS.items()}
    cfg = AdapterConfig(
        method="vera",
        rank=rank,
        targets=_targets(list(flat), kernels),
        dropout=float(config.get("vera_dropout") or 0.0),
        projection_seed=int(config.get("projection_prng_key", 0)),
        d_initial=float(config.get("d_initial", 0.1)),
    )
    matched_entries(params, adapters, cfg)  # the projections cover every module: (r, >= d_in), (>= d_out, r)
    return adapters, cfg
