"""scripts/memory_plan.py: the run's real train step compiled on shapes gives the memory of the real one."""

import json
import math
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from conftest import run_command
from dora_jax import base_model, models, run_config, runs, train
from dora_jax.errors import ConfigError
from scripts import memory_plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def small_config(**train_overrides):
    config = run_config.defaults()
    config.model.hf_dir = "random"
    config.model.base.architecture.update(SMALL)
    config.train.update(batch_size=8, **train_overrides)
    return config


def nbytes(tree) -> int:
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def dora_plan():
    return memory_plan.plan(small_config())


def test_the_plan_equals_the_memory_of_the_real_compiled_step(dora_plan):
    training = train.build(small_config())
    args = (training.state, training.frozen, training.batch(0), training.step_rng(0))
    memory = training.train_step.lower(*args).compile().memory_analysis()
    real = (memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes)
    assert (dora_plan["argument_bytes"], dora_plan["output_bytes"], dora_plan["temp_bytes"]) == real
    assert dora_plan["alias_bytes"] == memory.alias_size_in_bytes > 0  # the donated state
    # by hand: the base and the adapters (float32), Adam's two moments of the adapters, the batch's 3 arrays
    run = runs.place_abstract(small_config())
    params, adapters = nbytes(run.frozen), nbytes(run.trainable["adapters"])
    batch = 3 * 8 * memory_plan.sequence_length(small_config()) * 4
    assert 0 <= dora_plan["argument_bytes"] - (params + 3 * adapters + batch) < 256  # step counters, the key


def test_eight_devices_with_fsdp_hold_an_eighth_of_every_embed_axis_from_the_command_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    table = tmp_path / "plans.md"
    argv = [sys.executable, "-m", "scripts.memory_plan", "--config=configs/default.py", "--devices=8", "--json"]
    argv += [f"--markdown={table}"]
    argv += ["--config.model.hf_dir=random", "--config.train.batch_size=8", "--config.mesh.fsdp=8"]
    argv += [f"--config.model.base.architecture.{k}={v}" for k, v in SMALL.items()]
    argv += ["--config.train.finetune=full", "--device_memory=1GiB"]
    result = run_command(argv, env=env, timeout=300)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["devices"] == 8 and figures["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and figures["fits"]
    # by hand: fsdp splits each parameter's embed axis (64 = 8 x 8) in 8, the norms stay whole; the
    # params and Adam's two moments of each; one of the batch's 8 rows per device
    model, params = base_model.abstract_base(small_config())
    specs = jax.tree.leaves(models.logical_axes(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    leaves = jax.tree.leaves(params)
    split = sum(nbytes(leaf) for leaf, spec in zip(leaves, specs, strict=True) if "embed" in tuple(spec))
    whole = nbytes(leaves) - split
    rows = 3 * memory_plan.sequence_length(small_config()) * 4
    assert 0 <= figures["argument_bytes"] - (3 * (split / 8 + whole) + rows) < 256
    header, rule, row = table.read_text().splitlines()  # the header, then the plan as a row
    assert header == memory_plan.MARKDOWN_HEADER.splitlines()[0] and row == memory_plan.markdown_row(figures).strip()
    assert row.startswith("| cpu | 8 | full | none | none | no | 8 x ")


def test_a_bad_device_memory_is_named():
    with pytest.raises(ConfigError, match=r"--device_memory='80 gigs': expected a number with an optional unit"):
        memory_plan.parse_bytes("80 gigs")
    assert memory_plan.parse_bytes("80GiB") == 80 * 2**30 and memory_plan.parse_bytes("24GB") == 24 * 10**9


def test_the_plan_needs_only_config_json(tmp_path, dora_plan):
    (tmp_path / "config.json").write_text(
        json.dumps(dict(SMALL, model_type="llama", vocab_size=run_config.defaults().model.base.architecture.vocab_size))
    )
    config = small_config()
    config.model.hf_dir = str(tmp_path)
    config.model.base.architecture.update(num_hidden_layers=1)  # not read: the directory's config.json is
    planned = memory_plan.plan(config)
    assert planned["argument_bytes"] == dora_plan["argument_bytes"]
    np.testing.assert_allclose(planned["flops"], dora_plan["flops"], rtol=1e-6)
