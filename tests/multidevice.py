"""Runs in a subprocess with 8 forced CPU devices (XLA_FLAGS) and prints JSON results for test_train.py.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dora_jax import evaluate, run_config, train  # noqa: E402
from dora_jax.errors import ConfigError  # noqa: E402

MESHES = {
    "one_device": dict(data=1, fsdp=1, tensor=1),
    "data": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "tensor": dict(data=1, fsdp=1, tensor=8),
    "mixed": dict(data=2, fsdp=2, tensor=2),
}


def config(mesh, method="dora"):
    """``method``: dora, full, or folded (DoRA with ``adapter.forward="folded"``)."""
    c = run_config.defaults()
    c.model.hf_dir = "random"
    c.adapter.method = "dora" if method == "folded" else method
    c.adapter.forward = "folded" if method == "folded" else "factored"
    c.train.batch_size = 16
    c.train.grad_accum = 2
    c.data.eval_batch_size = 16
    c.mesh.update(mesh)
    return c


def losses(mesh, method, steps=5):
    run = train.build(config(mesh, method))
    state, out = run.state, []
    for step in range(steps):
        state, metrics = run.train_step(state, run.frozen, run.batch(step), run.step_rng(step))
        out.append(float(metrics["loss"]))
    return out


def argument_bytes(mesh):
    run = train.build(config(mesh, "full"))
    compiled = run.train_step.lower(run.state, run.frozen, run.batch(0), run.step_rng(0)).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def eval_scores(mesh):
    """Sequence log-probabilities of one evaluation batch, scored by the sharded evaluator."""
    run = train.build(config(mesh))
    score = evaluate.sharded_metric(run, run.state["trainable"], evaluate.sequence_logprobs)
    return np.asarray(score(run.source.eval_batches()[0])).tolist()


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
    results = {
        "losses": {
            f"{method}/{name}": losses(mesh, method)
            for method, names in (
                ("dora", list(MESHES)),
                ("full", ["one_device", "fsdp", "tensor"]),
                ("folded", ["one_device", "fsdp", "mixed"]),
            )
            for name, mesh in MESHES.items()
            if name in names
        },
        "eval_scores": {name: eval_scores(MESHES[name]) for name in ("one_device", "data", "mixed")},
        "argument_bytes": {name: argument_bytes(MESHES[name]) for name in ("data", "fsdp")},
        "mesh_error": error(dict(data=3, fsdp=1, tensor=1)),
        "batch_error": error(dict(data=8, fsdp=1, tensor=1), **{"train.batch_size": 12}),
    }
    print("RESULTS " + json.dumps(results))
