"""Sweeps: points from products and zips, one run directory per point, skip / record / resume, report."""

import csv
import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags
from test_train import shared_base_cache

from dora_jax import sweep, sweep_report
from dora_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]

SWEEP_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_train import small
from dora_jax import sweep

def get_config():
    return small({cache!r}, **{{"train.steps": 4, "train.eval_every": 4, "export.peft": False}})

def get_sweep():
    grid = sweep.zip({{"adapter.method": ["lora", "dora"]}}, {{"adapter.rank": [2, 4]}})
    return grid + [{{"adapter.targets": "nowhere/kernel", "adapter.rank": 2}}]  # matches no kernel: fails
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(sweep file, workdir, statuses) of a 3-point sweep (one point fails), run once."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "tiny_sweep.py"
    path.write_text(SWEEP_FILE.format(tests=str(ROOT / "tests"), cache=str(shared_base_cache(tmp_path_factory))))
    statuses = sweep.run(str(path), root / "run")
    return str(path), root / "run", statuses


def test_product_varies_the_first_part_slowest_and_zip_pairs_points():
    assert sweep.product({"a": [1, 2]}, {"b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert sweep.zip({"a": [1, 2]}, [{"b": 3}, {"b": 4}]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweep.product({"a": [1]}, sweep.zip({"b": [1, 2]}, {"c": [3, 4]})) == [
        {"a": 1, "b": 1, "c": 3},
        {"a": 1, "b": 2, "c": 4},
    ]
    with pytest.raises(ConfigError, match=r"sweep.zip: the parts have different lengths \[2, 1\]"):
        sweep.zip({"a": [1, 2]}, {"b": [1]})


def test_a_point_directory_reads_as_its_overrides_and_is_filesystem_safe():
    assert sweep.point_name({"adapter.method": "dora", "adapter.rank": 4, "seed": 0}) == (
        "adapter.method=dora,adapter.rank=4,seed=0"
    )
    assert sweep.point_name({"data.path": "/data/my file.json"}) == "data.path=_data_my_file.json"


def test_a_key_the_schema_lacks_is_named_before_anything_runs(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from dora_jax import run_config\n"
        "def get_config():\n    return run_config.defaults()\n"
        "def get_sweep():\n    return [{'adapter.rank': 4}, {'adapter.rnak': 8}]\n"
    )
    with pytest.raises(ConfigError, match=r"sweep point 1 \(adapter.rnak=8\): key 'adapter.rnak' is unknown; .*'rank'"):
        sweep.run(str(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing started


def test_the_paper_rank_sweep_refuses_to_start_without_its_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"\['data.path', 'model.hf_dir'\] not set \(placeholders\)"):
        sweep.run(str(ROOT / "configs" / "sweeps" / "paper_rank.py"), tmp_path / "run")
    base, points = sweep.load(
        str(ROOT / "configs" / "sweeps" / "paper_rank.py"), {"model.hf_dir": "/m", "data.path": "/d"}
    )
    assert len(sweep.check(base, points)) == 10
    assert {(p["adapter.method"], p["adapter.rank"], p["train.learning_rate"]) for p in points} >= {
        ("dora", 32, 1e-4),
        ("dora", 8, 2e-4),
        ("lora", 64, 3e-4),
    }


def test_the_variants_sweep_holds_every_method_as_a_valid_point():
    base, points = sweep.load(str(ROOT / "configs" / "sweeps" / "variants.py"), {})
    assert len(sweep.check(base, points)) == 18
    assert {p["adapter.method"] for p in points} == {"lora", "dora", "vera", "dvora"}
    assert sum("adapter.magnitude_targets" in p for p in points) == 3


@pytest.mark.parametrize("name", ["quantized.py", "quantized_minilm.py"])
def test_the_quantized_sweeps_run_one_dora_point_per_base_format(name):
    overrides = {"model.hf_dir": "/m", "data.path": "/d"} if "minilm" in name else {}
    base, points = sweep.load(str(ROOT / "configs" / "sweeps" / name), overrides)
    configs = sweep.check(base, points)
    assert [c.model.quantize for c in configs] == ["none", "nf4", "int8"]
    assert {(c.train.finetune, c.adapter.method) for c in configs} == {("adapter", "dora")}


def test_every_point_runs_in_its_directory_and_a_failure_is_recorded(swept):
    _, workdir, statuses = swept
    assert list(statuses.values()) == ["done"] * 2 + ["failed"]
    failed = workdir / "adapter.targets=nowhere_kernel,adapter.rank=2"
    assert "matches no" in (failed / "error.txt").read_text()
    summary = json.loads((workdir / "adapter.method=dora,adapter.rank=4" / "summary.json").read_text())
    assert summary["method"] == "dora" and summary["step"] == 4


def test_finished_points_are_skipped_when_the_sweep_runs_again(swept):
    path, workdir, _ = swept
    again = sweep.run(path, workdir, report=False)
    assert list(again.values()) == ["skipped"] * 2 + ["failed"]


def test_report_has_a_row_per_point_with_its_status_and_a_plot_per_metric(swept):
    _, workdir, _ = swept
    with (workdir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["done"] * 2 + ["failed"]
    assert {"adapter.method", "adapter.rank", "adapter.targets", "eval/loss", "eval/exact_match"} <= set(rows[0])
    table = (workdir / "results.md").read_text()
    assert "| lora | 2 |  | 1/1 |" in table and "| 0/1 (failed) | – |" in table
    plots = sorted(p.name for p in (workdir / "plots").iterdir())
    assert plots == [
        "exact_match_vs_adapter.rank.png",
        "loss_vs_adapter.rank.png",
        "token_accuracy_vs_adapter.rank.png",
    ]


def test_a_regex_value_stays_in_its_own_table_cell():
    rows = [{"adapter.targets": r".*/(q|v)/kernel", "seed": 0, "status": "done", "eval/loss": 1.0}]
    table = sweep_report.markdown(["adapter.targets", "seed"], ["loss"], rows)
    assert r"| .*/(q\|v)/kernel | 1/1 | 1.0000 ± 0.0000 |" in table


def test_listed_commands_give_the_points_config(swept):
    path, workdir, _ = swept
    base, points = sweep.load(path)
    line = sweep.command(path, workdir, points[1])
    assert f"--workdir={workdir}/adapter.method=dora,adapter.rank=4" in line
    argv = ["train"] + [arg for arg in line.split()[3:] if not arg.startswith("--workdir")]
    values = flags.FlagValues()  # the train CLI's parsing: config_flags reads the overrides from argv
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    assert values.config.to_dict() == sweep.point_config(base, points[1]).to_dict()


def test_one_point_runs_alone_and_the_others_report_as_missing(swept, tmp_path):
    path, _, _ = swept
    statuses = sweep.run(path, tmp_path / "one", point=2)
    assert statuses == {"adapter.targets=nowhere_kernel,adapter.rank=2": "failed"}
    keys, _, rows = sweep_report.gather(tmp_path / "one")
    assert [row["status"] for row in rows] == ["missing"] * 2 + ["failed"]
    with pytest.raises(ConfigError, match=r"--point=3: the sweep has points 0..2"):
        sweep.run(path, tmp_path / "one", point=3)
