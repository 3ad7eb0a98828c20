"""PEFT adapter directories in and out (``adapter_config.json`` + ``adapter_model.safetensors``).

The format is the one peft 0.21 writes for LoRA and for ``use_dora=True``: tensors
``base_model.model.<hf module>.lora_A.weight`` (r, d_in), ``.lora_B.weight`` (d_out, r) and
``.lora_magnitude_vector`` (d_out,), so ``A = lora_A.weightᵀ``, ``B = lora_B.weightᵀ``,
``m = lora_magnitude_vector`` (an embedding table's: ``lora_embedding_A`` / ``lora_embedding_B``).
Keys and HF module names: ``peft_layout``; VeRA adapters: ``peft_vera``.

A magnitude-only module (``AdapterConfig.magnitude_targets``) has no PEFT form of its own: it is
written as a DoRA module of rank 1 (``rank_pattern``) whose ``lora_A`` and ``lora_B`` are zero,
which PEFT computes as exactly ``m * W0 / ||W0||_c``, and read back as magnitude-only.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dora_jax import models, targets
from dora_jax.core import AdapterConfig, adapter_entries
from dora_jax.errors import ConfigError, ShapeError, TargetError
from dora_jax.io import peft_vera
from dora_jax.io.peft_layout import (
    CONFIG_FILE,
    EMBEDDING_SUFFIXES,
    HEAD_KEYS,
    HEAD_MODULES,
    PREFIX,
    SAVED_TABLE,
    SUFFIXES,
    WEIGHTS_FILE,
    ModuleTable,
    from_peft,
    input_axes_of,
    is_conv,
    keys_by_module,
    module_table,
    pattern_of,
    peft_shapes,
    rank_patterns,
    saves_head,
    suffixes_of,
    target_modules,
    targets_of,
    to_peft,
)
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

PEFT_TYPES = ("LORA", "VERA")
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


def export_peft(
    adapters: Any,
    cfg: AdapterConfig,
    out_dir: str | pathlib.Path,
    *,
    model: Any = None,
    modules: Mapping[str, str] | None = None,
    params: Any = None,
    base_model_name_or_path: str | None = None,
    head: Any = None,
) -> pathlib.Path:
    """Writes ``adapters`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads: a
    LoRA / DoRA adapter (``LoraConfig``) or a VeRA one (``VeraConfig`` with ``save_projection``).

    The PyTorch module names come from a zoo ``model``, or for any other model from ``modules``
    ({Flax leaf path: PyTorch module name}, e.g. ``{"conv/kernel": "features.0"}``) with its ``params``
    (arrays or shapes): Linear, Embedding and Conv1d-3d layers. ``head``: the trained ``classifier``
    params of a zoo sequence classifier, saved as PEFT saves ``modules_to_save``. PEFT has no DVoRA:
    such adapters are refused (export the merged model instead).
    """
    if cfg.method == "dvora":
        raise ConfigError(
            "PEFT has no DVoRA (VeRA's update under DoRA's magnitude): export the merged model instead "
            "(python -m dora_jax.export --format=merged, or export.merged=True and export.peft=False in a run)"
        )
    table = module_table(model, modules, params)
    adapters = adapters if model is None else models.unrolled(model, adapters)
    entries = adapter_entries(adapters)
    stacked = sorted(path for path in entries if cfg.stacked_for(path))
    if stacked:
        raise ConfigError(
            f"{stacked} hold stacks of layers (AdapterConfig.stacked_axes) and PEFT names one module per layer: "
            "give each layer its own leaf (kernel and adapter sliced along the stacked axes) and a module name "
            "in modules=, or export the merged model"
        )
    for path in entries:
        if path not in table.names:
            raise TargetError(
                f"adapter for {path!r} names no kernel of {table.owner} that PEFT adapts; its kernels:\n"
                + "\n".join(f"  {p}" for p in table.names)
            )
        shape = table.shapes[path]
        if is_conv(shape) and cfg.axes_for(path, shape) != tuple(range(len(shape) - 1)):
            raise ShapeError(
                f"{path!r}: PEFT's ConvNd adapter contracts the window and input channels, axes "
                f"{tuple(range(len(shape) - 1))}; AdapterConfig.input_axes gives {cfg.axes_for(path, shape)}"
            )
    if head is not None and model is None:
        raise ConfigError("head= is a zoo sequence classifier's head; with modules= it has no PEFT name")
    write = peft_vera.vera_tensors if cfg.vector_based else _lora_tensors
    tensors, config = write(adapters, entries, cfg, table)
    if head is not None:
        tensors[HEAD_KEYS["kernel"]] = np.ascontiguousarray(np.asarray(head["kernel"]).T)
        tensors[HEAD_KEYS["bias"]] = np.asarray(head["bias"])
    config.update(
        task_type=None if model is None else models.family(model).peft_task_type,
        base_model_name_or_path=base_model_name_or_path,
        r=cfg.rank,
        target_modules=target_modules(list(entries), table),
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


def _lora_tensors(adapters, entries, cfg, table: ModuleTable) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A LoRA / DoRA adapter's tensors and ``LoraConfig`` fields; magnitude-only modules as rank-1 zero A, B."""
    tensors: dict[str, np.ndarray] = {}
    magnitude_only = [path for path, adapter in entries.items() if "a" not in adapter]
    parts = "abm" if cfg.method == "dora" else "ab"
    for path, adapter in entries.items():
        key, suffixes, shape = PREFIX + table.names[path], suffixes_of(path), table.shapes[path]
        if "a" not in adapter:  # rank 1, A = B = 0: PEFT's DoRA then computes m * W0 / ||W0||_c
            zeros = {"a": np.zeros((*shape[:-1], 1), np.float32), "b": np.zeros((1, shape[-1]), np.float32)}
            adapter = {**zeros, **adapter}
        tensors.update({key + suffixes[p]: to_peft(p, adapter[p], shape) for p in parts})
    config = {
        "peft_type": "LORA",
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_dora": cfg.method == "dora",
        "use_rslora": cfg.rslora,
        "init_lora_weights": True if cfg.init == "kaiming_uniform" else "gaussian",
        "rank_pattern": {pattern: 1 for pattern in rank_patterns(magnitude_only, table)},
        "alpha_pattern": {},
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


def read_peft_head(in_dir: str | pathlib.Path) -> dict[str, jnp.ndarray] | None:
    """The classifier head a SEQ_CLS adapter saves (``{"kernel": (d, labels), "bias": (labels,)}``), or None.

    ``import_peft`` returns the adapters only; a sequence classifier also needs this head
    (``dj.io.load_hf(base, num_labels=...)`` then ``{**params, "classifier": head}``).
    """
    in_dir = pathlib.Path(in_dir)
    config, tensors = _open(in_dir)
    names = set(tensors.names())
    present = [key for key in HEAD_KEYS.values() if key in names]
    if not present or not saves_head(config):
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


def _check_saved_tables(
    keys: set[str], tensors: SafetensorsDirectory, paths: dict[str, str], params: Any, weights: pathlib.Path
) -> None:
    """PEFT saves a targeted embedding's table beside its adapter: it must be the base model's own (a
    resized or retrained vocabulary would silently change the model); abstract ``params`` check shapes."""
    leaves = targets.leaves_by_path(params)
    for key in sorted(keys):
        path = paths.get(key.removeprefix(PREFIX).removesuffix(SAVED_TABLE))
        if path is None or not path.endswith("/embedding"):
            raise TargetError(f"{weights}: key {key!r} names no embedding table of the model")
        base = leaves[path]
        same = tensors.shape(key) == tuple(base.shape)
        if same and isinstance(base, jax.Array | np.ndarray):
            same = np.array_equal(np.asarray(tensors.get(key), np.float32), np.asarray(base, np.float32))
        if not same:
            raise ConfigError(
                f"{weights}: {key!r} is an embedding table different from the base model's {path!r} (a resized "
                "or retrained vocabulary?): importing the adapter alone would drop it; merge it into the base first"
            )


def import_peft(
    in_dir: str | pathlib.Path, params: Any, *, model: Any = None, modules: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], AdapterConfig]:
    """(adapters, AdapterConfig) from a PEFT adapter directory (ours or PEFT's), for a zoo ``model`` or
    for any model whose PyTorch module names ``modules`` gives ({Flax leaf path: module name}, as for
    ``export_peft``). A convolution's adapter comes with its ``input_axes`` rule in the config.

    A SEQ_CLS adapter's classifier head is not an adapter: ``read_peft_head`` reads it.
    """
    if model is None:
        return _import(pathlib.Path(in_dir), params, module_table(None, modules, params))
    # a zoo model's names are its unrolled layers; a scanned model gets its adapters stacked
    params = models.unrolled(model, params)
    adapters, cfg = _import(pathlib.Path(in_dir), params, module_table(model, None, params))
    return models.in_layout(model, adapters), cfg


def _import(in_dir: pathlib.Path, params: Any, table: ModuleTable) -> tuple[dict[str, Any], AdapterConfig]:
    config, tensors = _open(in_dir)
    if config["peft_type"] == "VERA":
        return peft_vera.import_vera(in_dir, config, tensors, params, table)
    weights = in_dir / WEIGHTS_FILE
    paths = {hf: path for path, hf in table.names.items()}
    method = "dora" if config.get("use_dora") else "lora"
    parts = "abm" if method == "dora" else "ab"
    head_keys = set(HEAD_KEYS.values()) if saves_head(config) else set()
    saved_tables = {key for key in tensors.names() if key.endswith(SAVED_TABLE)}
    _check_saved_tables(saved_tables, tensors, paths, params, weights)
    suffixes = [*SUFFIXES.items(), *EMBEDDING_SUFFIXES.items()]
    by_module = keys_by_module(set(tensors.names()) - head_keys - saved_tables, suffixes, table, weights)
    for keys in by_module.values():
        if "m" in keys and "m" not in parts:
            raise ConfigError(
                f"{in_dir / CONFIG_FILE}: use_dora is false but {weights} holds DoRA magnitude {keys['m']!r}"
            )
    if not by_module:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    rank_pattern = config.get("rank_pattern") or {}
    flat, magnitudes = {}, {}
    for module, keys in by_module.items():
        path = paths[module]
        missing = [PREFIX + module + suffixes_of(path)[p] for p in parts if p not in keys]
        if missing:
            raise CheckpointError(f"{weights}: module {module!r} lacks {missing}")
        pattern = pattern_of(module, rank_pattern)
        # A module with a rank of its own is read only as export_peft writes a magnitude-only one.
        if pattern is not None and (method != "dora" or any(np.any(tensors.get(keys[p])) for p in "ab")):
            raise ConfigError(
                f"{in_dir / CONFIG_FILE}: rank_pattern {{{pattern!r}: {rank_pattern[pattern]}}} gives module "
                f"{module!r} a rank of its own, which is supported only for a DoRA module whose lora_A and lora_B "
                "are zero (a magnitude-only module, as dora_jax exports it)"
            )
        rank = int(config["r"] if pattern is None else rank_pattern[pattern])
        shape = table.shapes[path]
        expected = peft_shapes(shape, rank, embedding=path.endswith("/embedding"))
        for part, key in keys.items():
            if tensors.shape(key) != expected[part]:
                raise ShapeError(
                    f"{weights}: {key!r} has shape {tensors.shape(key)}; r={rank} and the kernel "
                    f"{path!r} of shape {shape} need {expected[part]}"
                )
        arrays = {p: jnp.asarray(from_peft(p, np.array(tensors.get(k)), shape)) for p, k in keys.items()}
        if pattern is None:
            flat[path] = arrays
        else:
            magnitudes[path] = {"m": arrays["m"]}
    if not flat:
        raise ConfigError(f"{weights}: every module is magnitude-only; at least one needs lora_A and lora_B")
    cfg = AdapterConfig(
        method=method,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        targets=targets_of(list(flat), table),
        magnitude_targets=targets_of(list(magnitudes), table) if magnitudes else "",
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora", False)),
        init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming_uniform",
        input_axes=input_axes_of([*flat, *magnitudes], table),
    )
    return targets.nest({**flat, **magnitudes}), cfg
