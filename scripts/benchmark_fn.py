"""The benchmark's rows for models that are not Flax linen, adapted through ``dj.inject_fn``.

Two residual MLP stacks of the Llama shape's width (``--llama-hidden``, ``--llama-layers``; blocks
``x + W_down gelu(W_up x)``, 4x wide): one written as a Flax NNX model, one in plain JAX over a dict of
arrays. Each trains full fine-tuning, LoRA and DoRA through ``inject_fn`` (factored), and DoRA through
``dj.merge`` (W' built and differentiated), on ``batch x seq`` tokens regressed onto a fixed target:
the same train step (``dj.optim.make_train_step``, AdamW), timed round-robin as ``scripts/benchmark.py``
times its rows, with the compiled FLOPs and peak memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dora_jax as dj
from dora_jax import metrics

MODELS = ("nnx_mlp", "jax_mlp")
VARIANTS = (("full", None, None), ("lora", "lora", "inject_fn"), ("dora_exact", "dora", "inject_fn"))
VARIANTS += (("dora_exact", "dora", "merge"),)
TARGETS = {"nnx_mlp": r"layers/\d+/(up|down)/kernel", "jax_mlp": r"layer_\d+/(up|down)"}


class Block(nnx.Module):
    def __init__(self, hidden: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(hidden, 4 * hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(4 * hidden, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


def model(name: str, hidden: int, layers: int) -> tuple[Callable, dict]:
    """``(fn, params)`` of one of ``MODELS``: ``fn(params, x)``."""
    if name == "nnx_mlp":
        graph, params = nnx.split(nnx.Sequential(*[Block(hidden, nnx.Rngs(i)) for i in range(layers)]))
        return (lambda p, x: nnx.merge(graph, p)(x)), params
    keys = jax.random.split(jax.random.key(0), 2 * layers)
    scale = 1.0 / np.sqrt(hidden)
    params = {
        f"layer_{i}": {
            "up": scale * jax.random.normal(keys[2 * i], (hidden, 4 * hidden)),
            "down": 0.5 * scale * jax.random.normal(keys[2 * i + 1], (4 * hidden, hidden)),
        }
        for i in range(layers)
    }

    def fn(params, x):
        for i in range(layers):
            x = x + jax.nn.gelu(x @ params[f"layer_{i}"]["up"]) @ params[f"layer_{i}"]["down"]
        return x

    return fn, params


def variant_step(fn, params, name: str, method: str | None, path: str | None, rank: int):
    """(jitted step, initial state, frozen) of one variant."""
    tx = optax.adamw(1e-4)
    if method is None:
        forward = lambda trainable, frozen, batch, rng: fn(trainable, batch["inputs"])  # noqa: E731
        trainable, frozen = jax.tree.map(jnp.copy, params), None
    else:
        cfg = dj.AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, targets=TARGETS[name], fallback="error")
        trainable = jax.tree.map(lambda a: a + 0.01, dj.init_adapters(jax.random.key(1), params, cfg))
        frozen = params
        if path == "merge":
            forward = lambda ad, p, batch, rng: fn(dj.merge(p, ad, cfg), batch["inputs"])  # noqa: E731
        else:
            adapted = dj.inject_fn(fn, cfg)
            forward = lambda ad, p, batch, rng: adapted(p, ad, batch["inputs"])  # noqa: E731
    step = jax.jit(dj.optim.make_train_step(forward, tx, metrics.squared_error), donate_argnums=(0,))
    return step, dj.optim.init_state(tx, trainable), frozen


def rows(args, compiled_figures: Callable) -> list[dict]:
    """The rows of ``MODELS`` named in ``args.models`` (the benchmark's row format)."""
    out = []
    for name in (m for m in args.models.split(",") if m in MODELS):
        fn, params = model(name, args.llama_hidden, args.llama_layers)
        inputs = jax.random.normal(jax.random.key(2), (args.batch * args.seq, args.llama_hidden))
        batch = {"inputs": inputs, "targets": jnp.tanh(inputs), "loss_mask": jnp.ones(inputs.shape[0])}
        runs = {}
        for variant, method, path in VARIANTS:
            key = variant if method is None else f"{variant}/{path}"
            step, state, frozen = variant_step(fn, params, name, method, path, args.rank)
            figures = compiled_figures(step, (state, frozen, batch, jax.random.key(0)))
            runs[key] = {"step": step, "state": state, "frozen": frozen, "figures": figures, "times": []}
        for repeat in range(args.warmup + args.steps):  # round-robin, as the linen rows
            for run in runs.values():
                start = time.perf_counter()
                run["state"], sums = run["step"](run["state"], run["frozen"], batch, jax.random.key(0))
                run["loss"] = float(jax.block_until_ready(sums["loss"]))
                if repeat >= args.warmup:
                    run["times"].append(time.perf_counter() - start)
        medians = {key: float(np.median(run["times"])) for key, run in runs.items()}
        for key, run in runs.items():
            lora = "lora/inject_fn"
            out.append(
                {
                    "model": name,
                    "variant": key,
                    "ms_per_step": 1e3 * medians[key],
                    "loss": run["loss"],
                    "tokens_per_s": inputs.shape[0] / medians[key],
                    "vs_lora": medians[key] / medians[lora],
                    "vs_full": medians[key] / medians["full"],
                    "peak_vs_lora": run["figures"]["peak_mib"] / runs[lora]["figures"]["peak_mib"],
                    "gflop": run["figures"]["gflop"],
                    "peak_mib": run["figures"]["peak_mib"],
                    "model_gflop": None,
                    "mfu": None,
                    "temp_mib": run["figures"]["temp_mib"],
                    "devices": jax.device_count(),
                }
            )
    return out
