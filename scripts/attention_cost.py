"""Forward and backward of one attention call: ours (recomputing backward) vs textbook autodiff and JAX's.

    python -m scripts.attention_cost --batch 16 --seq 128 --heads 12 --head-dim 32

For ``models.layers.dot_product_attention`` (``model.attention="recompute"``), the textbook version
(masked softmax, reverse-mode autodiff, key/value heads repeated for GQA) and
``jax.nn.dot_product_attention``'s XLA implementation (``model.attention="xla"``) it prints the bytes
the backward keeps from the forward (the residuals of ``jax.vjp``: what a train step holds per layer),
XLA's compiled FLOPs and temporary memory of the jitted gradient, and the median time of that
gradient over rounds run alternately in one process. Residuals and compiled figures are properties
of the programs; the times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax.models.layers import attention_bias, dot_product_attention
from scripts.compare_paths import compiled_cost


def textbook_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Masked softmax attention as written in textbooks; JAX differentiates it."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bthd->bhqt", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqt,bthd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def jax_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """``jax.nn.dot_product_attention``'s XLA implementation (``model.attention="xla"``)."""
    return dot_product_attention(q, k, v, allowed, "xla")


IMPLEMENTATIONS = {"ours": dot_product_attention, "textbook": textbook_attention, "jax_xla": jax_attention}


def residuals(attention, q, k, v, allowed) -> list[jax.Array]:
    """The arrays the backward keeps from the forward (``jax.vjp``'s residuals), not the inputs."""
    _, backward = jax.vjp(lambda q, k, v: attention(q, k, v, allowed), q, k, v)
    inputs = {id(x) for x in (q, k, v, allowed)}
    return [leaf for leaf in jax.tree.leaves(backward) if id(leaf) not in inputs]


def measure(args) -> dict[str, dict[str, float]]:
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (args.batch, args.seq, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (args.batch, args.seq, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (args.batch, args.seq, args.kv_heads, args.head_dim), dtype)
    allowed = attention_bias(args.seq, args.seq, None, causal=args.causal)
    results, grads = {}, {}
    for name, attention in IMPLEMENTATIONS.items():
        loss = lambda q, k, v, attention=attention: jnp.sum(attention(q, k, v, allowed).astype(jnp.float32))  # noqa: E731
        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        cost = compiled_cost(grads[name].lower(q, k, v).compile())
        results[name] = {
            "residual_mib": sum(r.nbytes for r in residuals(attention, q, k, v, allowed)) / 2**20,
            "temp_mib": cost["temp_bytes"] / 2**20,
            "gflop": cost["flops"] / 1e9,
            "times": [],
        }
        jax.block_until_ready(grads[name](q, k, v))
    for _ in range(args.steps):  # alternately: load hits both alike
        for name, grad in grads.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(q, k, v))
            results[name]["times"].append(time.perf_counter() - start)
    for figures in results.values():
        figures["ms"] = 1e3 * float(np.median(figures.pop("times")))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=0, help="key/value heads (GQA); 0: as many as --heads")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds")
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    return args


def main(argv=None) -> dict[str, dict[str, float]]:
    results = measure(parse_args(argv))
    print("| attention | residual MiB | temp MiB | GFLOP | ms (fwd+bwd) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['residual_mib']:.1f} | {r['temp_mib']:.1f} | {r['gflop']:.2f} | {r['ms']:.1f} |")
    ours = results["ours"]
    for other in ("textbook", "jax_xla"):
        time_ratio, residual_ratio = (
            ours["ms"] / results[other]["ms"],
            ours["residual_mib"] / results[other]["residual_mib"],
        )
        print(f"ours / {other}: time {time_ratio:.2f}, residuals {residual_ratio:.3f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
