"""The training CLI: end to end on the default task, resume, methods, meshes on 8 CPU devices, errors."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import dora_jax as dj
from conftest import TEST_XLA_FLAG, run_command
from dora_jax import base_model, io, run_config, train
from dora_jax.errors import ConfigError, InjectError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return shared_base_cache(tmp_path_factory)


def shared_base_cache(tmp_path_factory):
    """One synthetic-base cache for every test process of the session (the bases ``small`` asks for
    are built once; two processes building the same one at once both finish, the second reuses it)."""
    path = tmp_path_factory.getbasetemp().parent / "shared-base-cache"
    path.mkdir(exist_ok=True)
    return path


def small(cache_dir, **overrides):
    """The default config shrunk to seconds: a 40-step base and 10 adaptation steps."""
    c = run_config.defaults()
    c.model.base.cache_dir = str(cache_dir)
    c.model.base.steps = 40
    c.train.update(steps=10, batch_size=16, eval_every=5, log_every=1, progress_bar=False, warmup_steps=2)
    c.data.update(eval_batches=1, eval_batch_size=32)
    c.checkpoint.update(every=5, async_save=False)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir):
    return {row["step"]: row["train/loss"] for row in metrics(workdir) if "train/loss" in row}


def test_run_writes_metrics_checkpoints_and_a_peft_adapter(tmp_path, cache_dir):
    summary = train.train_and_evaluate(small(cache_dir), tmp_path)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert 0 < summary["trainable_share"] < 0.2 and summary["step"] == 10
    assert sorted(train_losses(tmp_path)) == list(range(1, 11))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]
    model, params = io.load_hf(base_model.synthetic_base_dir(small(cache_dir)))
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert cfg.method == "dora" and cfg.rank == 8 and len(jax.tree.leaves(adapters)) == 3 * 5 * 2
    assert json.loads((tmp_path / "summary.json").read_text())["after"] == summary["after"]


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, cache_dir):
    train.train_and_evaluate(small(cache_dir), tmp_path / "straight")
    stopped = train.train_and_evaluate(small(cache_dir, **{"train.stop_at": 5}), tmp_path / "resumed")
    assert stopped["step"] == 5 and "after" not in stopped
    assert not (tmp_path / "resumed" / "adapter").exists()
    train.train_and_evaluate(small(cache_dir), tmp_path / "resumed")
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert straight == resumed  # exact floats: the data iterator and RNG resume where they stopped
    for name in ("adapter_model.safetensors",):
        assert (tmp_path / "straight" / "adapter" / name).read_bytes() == (
            tmp_path / "resumed" / "adapter" / name
        ).read_bytes()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_fine_tuning_learn_the_task(tmp_path, cache_dir, method):
    what = {"train.finetune": "full"} if method == "full" else {"adapter.method": method}
    summary = train.train_and_evaluate(small(cache_dir, **what), tmp_path)
    assert summary["method"] == method
    assert summary["after"]["loss"] < 0.85 * summary["before"]["loss"]
    if method == "full":
        assert summary["trainable_share"] == 1.0 and (tmp_path / "model" / "config.json").exists()


def test_magnitude_only_run_with_group_rates_exports_a_merged_model_equal_to_its_adapter(tmp_path, cache_dir):
    # The paper's Table 6 placement with LoRA+ and a faster magnitude, merged export on request.
    variant = {
        "adapter.targets": r".*/(q_proj|k_proj|v_proj)/kernel",
        "adapter.magnitude_targets": r".*/(o_proj|gate_proj|up_proj|down_proj)/kernel",
        "train.loraplus_ratio": 4.0,
        "train.magnitude_lr_ratio": 2.0,
        "export.merged": True,
    }
    summary = train.train_and_evaluate(small(cache_dir, **variant), tmp_path)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    model, merged = io.load_hf(tmp_path / "merged")
    _, params = io.load_hf(base_model.synthetic_base_dir(small(cache_dir)))
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert cfg.magnitude_targets == r".*/(down_proj|gate_proj|o_proj|up_proj)/kernel"
    assert set(adapters["layers_0"]["mlp"]["up_proj"]["kernel"]) == {"m"}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, dj.merge(params, adapters, cfg))


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_and_dvora_train_from_the_cli_and_export(tmp_path, cache_dir, method):
    exports = {"export.peft": method == "vera", "export.merged": method == "dvora"}  # PEFT has no DVoRA
    summary = train.train_and_evaluate(small(cache_dir, **{"adapter.method": method, **exports}), tmp_path)
    assert summary["method"] == method and summary["after"]["loss"] < summary["before"]["loss"]
    model, params = io.load_hf(base_model.synthetic_base_dir(small(cache_dir)))
    if method == "vera":
        adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
        assert cfg.method == "vera" and set(adapters["layers_0"]["self_attn"]["q_proj"]["kernel"]) == {
            "lambda_d",
            "lambda_b",
        }
    else:
        _, merged = io.load_hf(tmp_path / "merged")
        assert not (tmp_path / "adapter").exists()
        changed = (
            merged["layers_0"]["self_attn"]["q_proj"]["kernel"] - params["layers_0"]["self_attn"]["q_proj"]["kernel"]
        )
        assert float(np.abs(changed).max()) > 0


def test_dvora_with_a_peft_export_is_refused_before_the_run(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"adapter.method='dvora' with export.peft=True: PEFT has no DVoRA"):
        train.train_and_evaluate(small(cache_dir, **{"adapter.method": "dvora"}), tmp_path)
    assert not list(tmp_path.iterdir())


def test_gradient_accumulation_matches_the_full_batch(cache_dir):
    losses = {}
    for accum in (1, 4):
        run = train.build(small(cache_dir, **{"train.grad_accum": accum}))
        state, out = run.state, []
        for step in range(4):
            batch = run.batch(step)
            batch["loss_mask"] = batch["loss_mask"].at[:3].set(0.0)  # micro-batches with unequal token counts
            state, m = run.train_step(state, run.frozen, batch, run.step_rng(step))
            out.append(float(m["loss"]))
        losses[accum] = out
    np.testing.assert_allclose(losses[4], losses[1], rtol=1e-5)


def test_folded_forward_trains_like_the_factored_one(cache_dir):
    losses = {}
    for forward in ("factored", "folded"):
        run = train.build(small(cache_dir, **{"adapter.forward": forward, "adapter.norm_grad": "exact"}))
        state, out = run.state, []
        for step in range(3):
            state, m = run.train_step(state, run.frozen, run.batch(step), run.step_rng(step))
            out.append(float(m["loss"]))
        losses[forward] = out
    assert losses["factored"][-1] < losses["factored"][0]
    np.testing.assert_allclose(losses["folded"], losses["factored"], rtol=1e-5)


def test_scanned_layers_train_like_the_unrolled_ones(cache_dir):
    runs, losses = {}, {}
    for scan in (False, True):
        training = train.build(small(cache_dir, **{"model.scan_layers": scan, "adapter.dropout": 0.0}))
        state, losses[scan] = training.state, []
        for step in range(3):
            state, m = training.train_step(state, training.frozen, training.batch(step), training.step_rng(step))
            losses[scan].append(float(m["loss"]))
        runs[scan] = training.run
        runs[scan].trainable = state["trainable"]
    assert "layers" in runs[True].trainable["adapters"] and "layers_0" in runs[False].trainable["adapters"]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    trained = [jax.tree.leaves(runs[scan].adapters()) for scan in (True, False)]
    for got, want in zip(*trained, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)  # Adam steps of 5e-3 on float32 gradients


def test_workdir_holding_another_config_is_refused(tmp_path, cache_dir):
    train.train_and_evaluate(small(cache_dir, **{"train.stop_at": 2}), tmp_path)
    with pytest.raises(
        ConfigError, match=r"holds a run of another config \(1 keys differ: train.learning_rate: 0.005 -> 0.001\)"
    ):
        train.train_and_evaluate(small(cache_dir, **{"train.learning_rate": 1e-3}), tmp_path)
    assert train_losses(tmp_path) == {1: train_losses(tmp_path)[1], 2: train_losses(tmp_path)[2]}  # nothing lost


def test_unknown_config_key_names_the_valid_keys(tmp_path, cache_dir):
    c = small(cache_dir)
    c.train.stepz = 3
    with pytest.raises(ConfigError, match=r"config key 'train.stepz' is unknown; valid keys in 'train': \[.*'steps'"):
        train.train_and_evaluate(c, tmp_path)


def test_unknown_method_lists_the_choices(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"AdapterConfig.method: expected one of 'dora', 'lora', .*; got 'ia3'"):
        train.train_and_evaluate(small(cache_dir, **{"adapter.method": "ia3"}), tmp_path)


def test_cli_reports_a_bad_override_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dora_jax.train",
            "--config=configs/default.py",
            f"--workdir={tmp_path}",
            "--config.train.stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "dora_jax.train: bad flag" in result.stderr and "steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_targets_the_forward_cannot_run_are_reported_at_start_up(cache_dir, caplog):
    # An input-axes rule the layer does not contract (k_proj's nn.Dense contracts axis 0): merged instead.
    config = small(cache_dir, **{"adapter.targets": r".*/(q_proj|k_proj)/kernel"})
    config.adapter.input_axes = {r"layers_0/self_attn/k_proj/kernel": [1]}
    with caplog.at_level(logging.WARNING, "dora_jax.runs"):
        train.build(config)
    expected = (
        "target layers_0/self_attn/k_proj/kernel is merged into the kernel at every step (W' built): "
        "input_axes (1,) differ from nn.Dense's contraction over axis 0"
    )
    assert expected in caplog.text
    assert "q_proj" not in caplog.text and "layers_1" not in caplog.text
    config.adapter.fallback = "error"
    with pytest.raises(
        InjectError, match=r"fallback=error and targets .*: layers_0/self_attn/k_proj/kernel: input_axes"
    ):
        train.build(config)


def test_readme_run_command_adapts_the_default_task(tmp_path):
    """scripts/run.sh with the default config, as the README runs it (base cache kept in tmp_path)."""
    env = dict(os.environ, DORA_JAX_CACHE=str(tmp_path / "cache"))
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(TEST_XLA_FLAG, "")  # as a user runs it (see conftest.py),
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # with no compilation cache
    argv = ["bash", "scripts/run.sh", "--config=configs/default.py", f"--workdir={tmp_path / 'run'}"]
    result = run_command([*argv, "--config.train.progress_bar=False"], env=env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["exact_match"] < 0.05 and summary["after"]["exact_match"] > 0.95
    assert "eval exact match" in result.stdout


def test_export_command_writes_the_runs_adapter_and_merged_model(tmp_path, cache_dir):
    from dora_jax import export
    from dora_jax.core import merge

    train.train_and_evaluate(small(cache_dir), tmp_path / "run")
    export.export_run(tmp_path / "run", "peft", tmp_path / "peft")
    name = "adapter_model.safetensors"
    assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "run" / "adapter" / name).read_bytes()
    export.export_run(tmp_path / "run", "merged", tmp_path / "merged")
    model, params = io.load_hf(base_model.synthetic_base_dir(small(cache_dir)))
    adapters, cfg = io.import_peft(tmp_path / "peft", params, model=model)
    _, merged = io.load_hf(tmp_path / "merged")
    jax.tree.map(np.testing.assert_array_equal, merged, merge(params, adapters, cfg))


def test_export_command_errors_name_the_problem(tmp_path, cache_dir):
    from dora_jax import export

    with pytest.raises(ConfigError, match=r"config.json: no such file; is .* the --workdir of a dora_jax.train run"):
        export.export_run(tmp_path, "peft", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--format: expected one of \('peft', 'merged'\); got 'gguf'"):
        export.export_run(tmp_path, "gguf", tmp_path / "out")
    train.train_and_evaluate(small(cache_dir, **{"train.finetune": "full", "train.steps": 2}), tmp_path / "full")
    with pytest.raises(ConfigError, match=r"is a full fine-tuning run: it has no adapter; use --format=merged"):
        export.export_run(tmp_path / "full", "peft", tmp_path / "out")


def test_bfloat16_compute_over_float32_params_trains_with_float32_adapters(tmp_path, cache_dir):
    summary = train.train_and_evaluate(small(cache_dir, **{"model.compute_dtype": "bfloat16"}), tmp_path)
    assert np.isfinite(summary["after"]["loss"]) and summary["after"]["loss"] < summary["before"]["loss"]
    model, params = io.load_hf(base_model.synthetic_base_dir(small(cache_dir)))
    adapters, _ = io.import_peft(tmp_path / "adapter", params, model=model)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(adapters)} == {"float32"}
