"""Runs in a subprocess with 8 forced CPU devices (XLA_FLAGS) and prints JSON results for test_multidevice.py.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dora_jax import metrics, run_config, train  # noqa: E402
from dora_jax.errors import ConfigError  # noqa: E402

MESHES = {
    "one_device": dict(data=1, fsdp=1, tensor=1),
    "data": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "mixed": dict(data=2, fsdp=2, tensor=2),
}
SCORED = ("one_device", "mixed")  # meshes whose sharded evaluator is compared with one device's


def config(mesh, method="dora", scan=False):
    """``method``: dora, full, folded (DoRA with ``adapter.forward="folded"``) or splash (DoRA with Pallas'
    splash attention, in its interpreter on CPU, per shard); ``scan``: the decoder layers as one nn.scan
    (``model.scan_layers``), params and adapters stacked along ``layers``."""
    c = run_config.defaults()
    c.model.scan_layers = scan
    c.model.hf_dir = "random"
    c.model.base.architecture.num_hidden_layers = 1  # what is sharded is the same in every layer
    c.train.finetune = "full" if method == "full" else "adapter"
    c.adapter.forward = "folded" if method == "folded" else "factored"
    c.model.attention = "splash" if method == "splash" else "auto"
    c.train.batch_size = 16
    c.train.grad_accum = 2
    c.data.eval_batch_size = 16
    c.mesh.update(mesh)
    return c


def measure(mesh, method, steps=5, scores=False, scan=False):
    """Losses of ``steps`` train steps, the compiled step's argument bytes per device and, with
    ``scores``, the sequence log-probabilities of one evaluation batch scored by the sharded evaluator;
    one run built (and its step compiled) for all three."""
    training = train.build(config(mesh, method, scan))
    out = {"losses": []}
    if scores:  # before training: the steps donate the initial state
        score = training.run.scorer(metrics.sequence_logprobs)
        out["eval_scores"] = np.asarray(score(training.source.eval_batches()[0])).tolist()
    state = training.state
    for step in range(steps):
        state, sums = training.train_step(state, training.frozen, training.batch(step), training.step_rng(step))
        out["losses"].append(float(sums["loss"]))
    args = (state, training.frozen, training.batch(0), training.step_rng(0))
    compiled = training.train_step.lower(*args).compile()  # cached
    out["argument_bytes"] = compiled.memory_analysis().argument_size_in_bytes
    if method == "splash":  # the kernel runs per shard: a shard_map (Shardy's manual computation)
        out["per_shard"] = "manual_computation" in training.train_step.lower(*args).as_text()
    return out


def nnx_losses(shape, steps=3):
    """Losses of an NNX model trained through ``dj.inject_fn`` on a (data, fsdp) mesh of ``shape``: kernels
    split along fsdp over their input axis, the batch along data, the adapters replicated."""
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import dora_jax as dj

    mesh = Mesh(np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape), ("data", "fsdp"))
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
    graph, params = nnx.split(model)
    split = lambda x: NamedSharding(mesh, PartitionSpec("fsdp") if x.ndim == 2 else PartitionSpec())  # noqa: E731
    params = jax.device_put(params, jax.tree.map(split, params))
    cfg = dj.AdapterConfig(rank=4, targets=r"layers/\d+/kernel", fallback="error")
    adapted = dj.inject_fn(lambda p, x: nnx.merge(graph, p)(x), cfg)
    tx = optax.adamw(1e-2)
    forward = lambda ad, p, batch, rng: adapted(p, ad, batch["inputs"])  # noqa: E731
    step = jax.jit(dj.optim.make_train_step(forward, tx, metrics.squared_error))
    state = dj.optim.init_state(tx, dj.init_adapters(jax.random.key(2), params, cfg))
    inputs = jax.random.normal(jax.random.key(3), (16, 16))
    batch = {"inputs": inputs, "targets": jnp.tanh(inputs[:, :8]), "loss_mask": jnp.ones(16)}
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    losses = []
    for i in range(steps):
        state, out = step(state, params, batch, jax.random.key(i))
        losses.append(float(out["loss"]))
    return losses


def error(mesh, **overrides):
    c = config(mesh)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    try:
        train.build(c)
    except ConfigError as err:
        return str(err)
    return None


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    # Every sharded run is compared with DoRA's or full FT's run on one device. DoRA on the fsdp axis
    # alone and on the mixed mesh, which shards along all three (data and tensor alone add nothing the
    # mixed mesh does not cover); data and fsdp (whose memory is compared) for full FT; the mixed mesh for
    # the folded forward and for splash attention (compared with DoRA's on one device). DoRA on fsdp runs
    # the scanned layers (stacked kernels split along embed, the layers axis whole): its losses are
    # compared with the unrolled ones.
    plan = {
        "dora": ["one_device", "fsdp", "mixed"],
        "full": ["one_device", "data", "fsdp"],
        "folded": ["mixed"],
        "splash": ["mixed"],
    }
    runs = {
        f"{method}/{name}": measure(
            MESHES[name], method, scores=method == "dora" and name in SCORED, scan=(method, name) == ("dora", "fsdp")
        )
        for method, names in plan.items()
        for name in names
    }
    results = {
        "losses": {key: run["losses"] for key, run in runs.items()},
        "eval_scores": {name: runs[f"dora/{name}"]["eval_scores"] for name in SCORED},
        "argument_bytes": {name: runs[f"full/{name}"]["argument_bytes"] for name in ("data", "fsdp")},
        "splash_per_shard": runs["splash/mixed"]["per_shard"],
        "nnx_losses": {"one_device": nnx_losses((1, 1)), "mixed": nnx_losses((2, 4))},
        "mesh_error": error(dict(data=3, fsdp=1, tensor=1)),
        "batch_error": error(dict(data=8, fsdp=1, tensor=1), **{"train.batch_size": 12}),
    }
    print("RESULTS " + json.dumps(results))
