"""Compiled cost of one DoRA train step on a single Dense layer: factored and folded forward vs merge.

    python -m scripts.compare_paths --d 1024 --tokens 2048 --rank 16

Prints XLA's compiled FLOPs (`cost_analysis`) and temporary memory (`memory_analysis`) of the
training CLI's jitted step (``optim.make_train_step`` with its optimizer: AdamW, schedule,
clipping) for each path (``inject`` with ``forward="factored"`` or ``"folded"``; merge), for each
norm_grad, and their ratio. These are properties of the compiled program, not timings, so they do
not depend on machine load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

import dora_jax as dj
from dora_jax import metrics, optim, run_config
from dora_jax.core import AdapterConfig

PATHS = ("factored", "folded", "merge")


def compiled_train_step(path: str, cfg: AdapterConfig, d: int, tokens: int, batch: int = 8):
    """The compiled train step of the training CLI (``optim.make_train_step`` with its optimizer) on
    a (d, d) Dense layer regressing (batch, tokens // batch, d) inputs onto themselves."""
    model = nn.Dense(d)
    x = jax.ShapeDtypeStruct((batch, tokens // batch, d), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    adapters = jax.eval_shape(lambda p: dj.init_adapters(jax.random.key(1), p, cfg), params)
    if path in ("factored", "folded"):
        adapted = dj.inject(model.apply, dataclasses.replace(cfg, forward=path), fallback="error")
    else:
        adapted = lambda p, ad, inputs: model.apply({"params": dj.merge(p, ad, cfg)}, inputs)  # noqa: E731

    def forward(ad, p, batch, rng):
        return adapted(p, ad, batch["inputs"])

    tx = optim.make_optimizer(run_config.defaults().train, adapters)
    step = jax.jit(optim.make_train_step(forward, tx, metrics.squared_error))
    mask = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    data = {"inputs": x, "targets": x, "loss_mask": mask}
    state = jax.eval_shape(lambda ad: optim.init_state(tx, ad), adapters)
    return step.lower(state, params, data, jax.random.key(0)).compile()


def compiled_cost(compiled) -> dict[str, float]:
    """FLOPs and temporary bytes of a compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {"flops": float(cost["flops"]), "temp_bytes": float(memory.temp_size_in_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    rows = []
    print(
        f"| norm_grad | path | GFLOP | temp MiB | FLOPs vs merge |  (d={args.d}, tokens={args.tokens}, r={args.rank})"
    )
    print("|---|---|---|---|---|")
    for norm_grad in ("exact", "detach"):
        cfg = AdapterConfig(rank=args.rank, targets="kernel", norm_grad=norm_grad)
        costs = {p: compiled_cost(compiled_train_step(p, cfg, args.d, args.tokens)) for p in PATHS}
        for path in PATHS:
            ratio = costs[path]["flops"] / costs["merge"]["flops"]
            gflop, temp_mib = costs[path]["flops"] / 1e9, costs[path]["temp_bytes"] / 2**20
            print(f"| {norm_grad} | {path} | {gflop:.2f} | {temp_mib:.1f} | {ratio:.2f} |")
            rows.append({"norm_grad": norm_grad, "path": path, **costs[path], "flops_vs_merge": ratio})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
