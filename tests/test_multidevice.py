"""Sharded training and evaluation on 8 forced CPU devices: meshes give one device's results.

The runs happen once, in a subprocess (tests/multidevice.py) that sets XLA's forced host device count.
"""

import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, run_command


@pytest.fixture(scope="module")
def eight_devices():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = run_command([sys.executable, str(ROOT / "tests" / "multidevice.py")], env=env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.parametrize("method", ["dora", "full", "folded", "splash"])
def test_data_fsdp_and_tensor_meshes_give_the_losses_of_one_device(eight_devices, method):
    losses = {k.split("/")[1]: v for k, v in eight_devices["losses"].items() if k.startswith(method + "/")}
    # The folded forward and splash attention train like the factored one with the default attention: their
    # sharded runs are compared with DoRA's. DoRA's fsdp run scans its layers (model.scan_layers): it trains
    # like the unrolled one device.
    one_device = eight_devices["losses"][
        "dora/one_device" if method in ("folded", "splash") else f"{method}/one_device"
    ]
    assert losses  # the meshes tests/multidevice.py runs this method on
    for mesh, values in losses.items():
        np.testing.assert_allclose(values, one_device, rtol=1e-5, atol=1e-5, err_msg=mesh)


def test_splash_attention_runs_per_shard_on_a_mesh(eight_devices):
    assert eight_devices["splash_per_shard"]  # a Pallas kernel is not partitioned by XLA: a shard_map is


def test_sharded_evaluator_scores_like_one_device(eight_devices):
    scores = eight_devices["eval_scores"]
    assert len(scores["one_device"]) == 16
    np.testing.assert_allclose(scores["mixed"], scores["one_device"], rtol=1e-5, atol=1e-5)  # data x fsdp x tensor


def test_an_nnx_model_trained_through_inject_fn_on_a_data_and_fsdp_mesh_gives_one_devices_losses(eight_devices):
    losses = eight_devices["nnx_losses"]
    assert len(losses["one_device"]) == 3 and losses["one_device"][-1] < losses["one_device"][0]
    np.testing.assert_allclose(losses["mixed"], losses["one_device"], rtol=1e-5, atol=1e-6)


def test_fsdp_shrinks_per_device_parameter_memory(eight_devices):
    sizes = eight_devices["argument_bytes"]
    assert sizes["fsdp"] < sizes["data"] / 4


def test_mesh_and_batch_errors_on_eight_devices(eight_devices):
    assert eight_devices["mesh_error"] == (
        "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices, which does not divide the 8 devices available"
    )
    assert (
        eight_devices["batch_error"] == "train.batch_size=12 is not divisible by the batch axes data x fsdp = 8 x 1 = 8"
    )
