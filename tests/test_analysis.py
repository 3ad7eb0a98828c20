"""The weight-decomposition analysis: ΔM and ΔD per output column, the fit, and runs read from disk."""

import csv
import json

import jax
import numpy as np
import pytest
from test_train import shared_base_cache, small

import dora_jax as dj
from dora_jax import analysis, runs, train
from dora_jax.errors import ConfigError

RNG = np.random.default_rng(0)
W0 = RNG.standard_normal((6, 4))


def test_an_unchanged_kernel_has_no_change():
    assert analysis.kernel_changes(W0, W0) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_rescaling_each_column_changes_magnitude_only():
    scale = np.array([0.5, 1.0, 2.0, 3.0])
    delta_m, delta_d = analysis.kernel_changes(W0, W0 * scale)
    norms = np.linalg.norm(W0, axis=0)
    assert delta_m == pytest.approx(np.mean(np.abs(scale - 1.0) * norms)) and delta_d == pytest.approx(0.0, abs=1e-12)


def test_rotating_every_column_changes_direction_only():
    theta = 0.3
    rotation = np.eye(6)  # a rotation of the input space by theta in the plane of its first two axes
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    w0 = np.zeros((6, 4))
    w0[0] = [1.0, 2.0, 0.5, 3.0]  # every column in that plane: each turns by exactly theta
    delta_m, delta_d = analysis.kernel_changes(w0, rotation @ w0)
    assert delta_m == pytest.approx(0.0, abs=1e-12) and delta_d == pytest.approx(1.0 - np.cos(theta))


def test_columns_are_output_features_of_a_multi_axis_kernel():
    # (heads, head_dim, out) contracted over its first two axes: the same numbers as the (12, out) matrix.
    w0, wt = RNG.standard_normal((3, 4, 5)), RNG.standard_normal((3, 4, 5))
    expected = analysis.kernel_changes(w0.reshape(12, 5), wt.reshape(12, 5))
    assert analysis.kernel_changes(w0, wt, input_axes=(0, 1)) == pytest.approx(expected)


def test_fit_recovers_an_exact_line():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    stats = analysis.fit(x, 1.0 - 2.0 * x)
    assert stats["slope"] == pytest.approx(-2.0) and stats["intercept"] == pytest.approx(1.0)
    assert stats["correlation"] == pytest.approx(-1.0) and stats["points"] == 4


def test_a_sweep_directory_stands_for_its_points(tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "plots").mkdir()
    assert analysis.run_dirs([tmp_path]) == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ConfigError, match=r"neither a dora_jax.train run \(config.json\) nor a sweep"):
        analysis.run_dirs([tmp_path / "plots"])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A 10-step DoRA run keeping its step-5 snapshot, analysed; (workdir, csv rows)."""
    root = tmp_path_factory.mktemp("analysis")
    config = small(shared_base_cache(tmp_path_factory), **{"checkpoint.keep": 1, "checkpoint.keep_period": 5})
    train.train_and_evaluate(config, root / "run")
    analysis.analyse([root / "run"])
    with (root / "run" / "analysis.csv").open() as f:
        return root / "run", list(csv.DictReader(f))


def test_the_csv_has_a_row_per_kept_step_and_query_or_value_kernel(analysed):
    workdir, rows = analysed
    assert list(rows[0]) == ["run", "method", "step", "layer", "delta_m", "delta_d"]
    layers = {f"layers_{i}/self_attn/{p}/kernel" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert {(int(r["step"]), r["layer"]) for r in rows} == {(s, layer) for s in (5, 10) for layer in layers}
    assert {r["method"] for r in rows} == {"dora"} and (workdir / "fig2_dora.png").exists()
    assert "| dora | 1 | 8 |" in (workdir / "analysis.md").read_text()


def test_the_adapter_path_equals_the_numbers_of_the_merged_kernel(analysed):
    workdir, rows = analysed
    run = runs.load(workdir)  # the step-10 checkpoint
    base = jax.device_get(run.frozen)
    merged = dj.merge(base, jax.device_get(run.trainable["adapters"]), run.adapter_cfg)
    path = "layers_1/self_attn/v_proj/kernel"
    kernel = lambda tree: tree["layers_1"]["self_attn"]["v_proj"]["kernel"]  # noqa: E731
    row = next(r for r in rows if r["layer"] == path and r["step"] == "10")
    expected = analysis.kernel_changes(kernel(base), kernel(merged))
    assert (float(row["delta_m"]), float(row["delta_d"])) == pytest.approx(expected, rel=1e-9)
    assert expected[0] > 0 and expected[1] > 0
    assert json.loads((workdir / "analysis.json").read_text())["targets"] == analysis.DEFAULT_TARGETS
