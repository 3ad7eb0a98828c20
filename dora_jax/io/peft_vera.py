"""PEFT's VeRA adapters in and out: ``peft_type="VERA"`` with ``save_projection`` (the shared
``vera_A`` (r, d_in) and ``vera_B`` (d_out, r) once, ``vera_lambda_d`` and ``vera_lambda_b`` per module)."""

from __future__ import annotations

import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from dora_jax import targets
from dora_jax.core import AdapterConfig, matched_entries, vera
from dora_jax.errors import ConfigError, ShapeError
from dora_jax.io.peft_layout import (
    HEAD_KEYS,
    PREFIX,
    WEIGHTS_FILE,
    ModuleTable,
    is_conv,
    keys_by_module,
    saves_head,
    targets_of,
)
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

VERA_SUFFIXES = {"lambda_d": ".vera_lambda_d", "lambda_b": ".vera_lambda_b"}
PROJECTION_KEYS = {"shared_a": "base_model.vera_A", "shared_b": "base_model.vera_B"}


def vera_tensors(adapters, entries, cfg, table: ModuleTable) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A VeRA adapter's tensors (vectors per module, the shared projections once) and ``VeraConfig`` fields."""
    tensors: dict[str, np.ndarray] = {}
    others = [path for path in entries if path.endswith("/embedding") or is_conv(table.shapes[path])]
    if others:
        raise ConfigError(f"PEFT's VeRA adapts Linear layers only; these targets are tables or convolutions: {others}")
    for path, adapter in entries.items():
        for part in ("lambda_d", "lambda_b"):
            tensors[PREFIX + table.names[path] + VERA_SUFFIXES[part]] = np.asarray(adapter[part])
    projection = vera.projection_of(adapters)
    for part, key in PROJECTION_KEYS.items():  # PyTorch layout: vera_A (r, d_in), vera_B (d_out, r)
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


def import_vera(
    in_dir: pathlib.Path, config: dict[str, Any], tensors: SafetensorsDirectory, params: Any, table: ModuleTable
) -> tuple[dict[str, Any], AdapterConfig]:
    """A PEFT VeRA adapter: the vectors of each module and the shared projections it saved."""
    weights = in_dir / WEIGHTS_FILE
    names = set(tensors.names())
    missing = [key for key in PROJECTION_KEYS.values() if key not in names]
    if missing or not config.get("save_projection", True):
        raise ConfigError(
            f"{in_dir}: a VeRA adapter without its projections ({missing or 'save_projection=false'}): PEFT draws "
            "them with torch's generator from projection_prng_key, which JAX does not reproduce; save the "
            "adapter with VeraConfig(save_projection=True)"
        )
    paths = {hf: path for path, hf in table.names.items()}
    head_keys = set(HEAD_KEYS.values()) if saves_head(config) else set()
    keys = names - head_keys - set(PROJECTION_KEYS.values())
    by_module = keys_by_module(keys, list(VERA_SUFFIXES.items()), table, weights)
    if not by_module:
        raise CheckpointError(f"{weights}: holds no VeRA vectors")
    rank, leaves, flat = int(config["r"]), targets.leaves_by_path(params), {}
    for module, keys in by_module.items():
        lacking = [PREFIX + module + VERA_SUFFIXES[p] for p in VERA_SUFFIXES if p not in keys]
        if lacking:
            raise CheckpointError(f"{weights}: module {module!r} lacks {lacking}")
        d_out = leaves[paths[module]].shape[-1]
        for part, shape in (("lambda_d", (rank,)), ("lambda_b", (d_out,))):
            if tensors.shape(keys[part]) != shape:
                raise ShapeError(
                    f"{weights}: {keys[part]!r} has shape {tensors.shape(keys[part])}; r={rank} and the kernel "
                    f"{paths[module]!r} of shape {tuple(leaves[paths[module]].shape)} need {shape}"
                )
        flat[paths[module]] = {p: jnp.asarray(np.array(tensors.get(k))) for p, k in keys.items()}
    adapters = targets.nest(flat)
    adapters[vera.PROJECTION] = {p: jnp.asarray(np.array(tensors.get(k)).T) for p, k in PROJECTION_KEYS.items()}
    cfg = AdapterConfig(
        method="vera",
        rank=rank,
        targets=targets_of(list(flat), table),
        dropout=float(config.get("vera_dropout") or 0.0),
        projection_seed=int(config.get("projection_prng_key", 0)),
        d_initial=float(config.get("d_initial", 0.1)),
    )
    matched_entries(params, adapters, cfg)  # the projections cover every module: (r, >= d_in), (>= d_out, r)
    return adapters, cfg
