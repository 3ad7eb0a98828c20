"""The base model of a run: an HF directory, random weights, or the synthetic base built on first use.

The synthetic base is a small Llama pretrained on ``model.base.task`` by a full fine-tuning run of
``dora_jax.train`` and cached as an HF directory, one folder per distinct recipe, so that the
default run needs nothing downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dora_jax import io, models, run_config


def synthetic_base_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Where the synthetic base of ``config`` is cached: one folder per distinct recipe."""
    recipe = {
        "base": {k: v for k, v in run_config.flat(config.model.base).items() if k != "cache_dir"},
        "data": [config.data.length, config.data.num_symbols],
        "seed": config.seed,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = (
        config.model.base.cache_dir or os.environ.get("DORA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "dora_jax"
    )
    return pathlib.Path(root) / f"synthetic-base-{digest}"


def pretraining_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The full fine-tuning run that builds the synthetic base of ``config`` from random weights."""
    config = copy.deepcopy(config)  # sections are assigned below: the caller's config must not change
    base = config.model.base
    pretrain = run_config.defaults()
    pretrain.seed = config.seed
    pretrain.model.hf_dir = "random"
    pretrain.model.base = config.model.base
    pretrain.data = config.data
    pretrain.data.task = base.task
    pretrain.train.update(steps=base.steps, batch_size=base.batch_size, learning_rate=base.learning_rate)
    pretrain.train.finetune = "full"
    pretrain.train.warmup_steps = min(50, base.steps // 4)
    pretrain.train.eval_every = max(base.steps, 1)
    pretrain.train.progress_bar = config.train.progress_bar
    pretrain.checkpoint.every = max(base.steps, 1)
    pretrain.mesh = config.mesh
    return pretrain


def build_synthetic_base(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Pretrains the small base model on ``model.base.task`` once and caches it as an HF directory."""
    from dora_jax.train import train_and_evaluate  # the base is itself a training run

    target = synthetic_base_dir(config)
    if (target / "config.json").exists():
        return target
    base = config.model.base
    print(f"building the synthetic base model: {base.steps} steps of {base.task!r} -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
        train_and_evaluate(pretraining_config(config), tmp)
        try:
            os.replace(pathlib.Path(tmp) / "model", target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another run built the same base meanwhile (same recipe, same bytes): use the one in place.
            print(f"the synthetic base was built by another run meanwhile; using {target}", flush=True)
    return target


def base_module(config: ml_collections.ConfigDict, **module: Any) -> Any:
    """The module of the run's base model from its config alone (no weights read or built); ``module``:
    ``models.from_hf_config``'s options (dtype, param_dtype, remat, scan_layers, attention)."""
    if config.model.hf_dir in ("", "random"):
        return models.from_hf_config(config.model.base.architecture.to_dict(), **module)
    hf_dir = run_config.require_path("model.hf_dir", config.model.hf_dir)
    hf = io.read_config(hf_dir)
    hf = io.classifier_config(hf, config.model.num_labels) if config.model.num_labels else hf
    return models.from_hf_config(hf, **module)


def abstract_base(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(model, params) as ``load_base`` gives them, the params as ``jax.ShapeDtypeStruct``: from the
    model's ``config.json`` (or the random base's architecture) alone, no weight read or built."""
    dtype, compute = jnp.dtype(config.model.dtype), jnp.dtype(config.model.compute_dtype)
    model = base_module(config, dtype=compute, param_dtype=dtype, **_layers(config))
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), models.abstract_params(model))
    return model, jax.eval_shape(lambda p: _quantized(model, p, config), params)


def load_base(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(model, params) of the run's base model, params in ``model.dtype``."""
    dtype, compute = jnp.dtype(config.model.dtype), jnp.dtype(config.model.compute_dtype)
    if config.model.hf_dir == "random":
        model = models.from_hf_config(
            config.model.base.architecture.to_dict(), dtype=compute, param_dtype=dtype, **_layers(config)
        )
        return model, _quantized(model, models.init_params(model, jax.random.key(config.seed)), config)
    hf_dir = run_config.require_path("model.hf_dir", config.model.hf_dir) if config.model.hf_dir else None
    hf_dir = hf_dir or build_synthetic_base(config)
    quantize = {"quantize": config.model.quantize, "quantize_block": run_config.quantize_block(config)}
    return io.load_hf(
        hf_dir, dtype=dtype, compute_dtype=compute, num_labels=config.model.num_labels, **_layers(config), **quantize
    )


def _quantized(model: Any, params: Any, config: ml_collections.ConfigDict) -> Any:
    """``params`` with the base kernels quantized as ``model.quantize`` asks (unchanged for "none")."""
    return io.quantize_base(model, params, config.model.quantize, run_config.quantize_block(config))


def _layers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """How the run builds its decoder layers: ``model.remat``, ``model.scan_layers``, ``model.attention``."""
    return {"remat": config.model.remat, "scan_layers": config.model.scan_layers, "attention": config.model.attention}
