"""Faults injected, outcomes asserted: divergence, bad inputs, damaged checkpoints, strict JSON."""

import json
import math
import os
import pathlib

import numpy as np
import pytest
from test_train import shared_base_cache, small

from dora_jax import io, metrics_writer, run_config, train
from dora_jax.errors import ConfigError, DivergenceError
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The session's synthetic-base cache."""
    return shared_base_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished 10-step run (checkpoints at 5 and 10), trained once; tests work on copies."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train.train_and_evaluate(small(cache), workdir)
    return workdir


@pytest.fixture
def copy_of(finished, tmp_path):
    import shutil

    return shutil.copytree(finished, tmp_path / "run")


def test_metrics_and_summaries_are_strict_json():
    text = metrics_writer.dumps({"loss": float("nan"), "after": {"f1": math.inf, "ok": 1.5}, "xs": [-math.inf]})
    assert json.loads(text) == {"loss": None, "after": {"f1": None, "ok": 1.5}, "xs": [None]}


def test_a_diverging_run_stops_naming_the_steps_and_exports_nothing(tmp_path, cache):
    config = small(cache, **{"train.finetune": "full", "train.learning_rate": 1e30})
    with pytest.raises(DivergenceError, match=r"non-finite loss or gradient norm between steps \d+ and \d+"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "summary.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(v is None or math.isfinite(v) for row in rows for v in row.values())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.steps", -5, r"train.steps: expected a non-negative integer; got -5"),
        ("train.batch_size", 0, r"train.batch_size: expected a positive integer; got 0"),
        ("checkpoint.every", 0, r"checkpoint.every: expected a positive integer; got 0"),
    ],
)
def test_counts_a_run_cannot_use_are_named_before_anything_starts(tmp_path, key, value, message):
    config = run_config.defaults()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_encoder_is_refused_as_a_causal_lm(tmp_path):
    from test_models_hf import minilm_dir

    config = run_config.defaults()
    config.model.hf_dir = str(minilm_dir())
    with pytest.raises(ConfigError, match=r"trains a causal LM .* BertModel, an encoder without an LM head"):
        train.build(config)


def test_tokenizers_do_not_pad_or_truncate():
    from test_models_hf import minilm_dir

    tokenizer = io.load_tokenizer(minilm_dir())  # its tokenizer.json pads and truncates to 128
    assert len(tokenizer.encode("a short text").ids) < 10
    assert len(tokenizer.encode("word " * 300).ids) > 300


def test_shard_paths_outside_the_model_directory_are_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../other/model.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"shard \.\./other/model.safetensors lies outside"):
        SafetensorsDirectory(tmp_path / "model")


def test_a_truncated_safetensors_file_is_named(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor 'w' ends at byte \d+, the file"):
        SafetensorsDirectory(tmp_path)


def damage(step_dir):
    """Truncates the largest data file of a saved step (what a full disk or a killed copy leaves)."""
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[:10])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's abandoned reads
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(finished, copy_of, cache, capfd):
    damage(copy_of / "checkpoints" / "10")
    (copy_of / "summary.json").unlink()
    train.train_and_evaluate(small(cache), copy_of)  # resumes from step 5, redoes 6..10
    assert "checkpoint step 10 is damaged" in capfd.readouterr().err
    assert (copy_of / "checkpoints" / "damaged-10").is_dir()  # kept for inspection
    name = "adapter/adapter_model.safetensors"
    assert (copy_of / name).read_bytes() == (finished / name).read_bytes()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's abandoned reads
def test_no_intact_checkpoint_is_a_named_error_that_deletes_nothing(copy_of, cache):
    from dora_jax.io.checkpoints import CheckpointDamaged

    (copy_of / "summary.json").unlink()
    for step in ("5", "10"):
        damage(copy_of / "checkpoints" / step)
    expected = r"no checkpoint restores \(step 10: .*; step 5: .*\); nothing was deleted"
    with pytest.raises(CheckpointDamaged, match=expected):
        train.train_and_evaluate(small(cache), copy_of)
    assert sorted(p.name for p in (copy_of / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]


def test_a_resumed_run_logs_each_step_once(copy_of, cache):
    import shutil

    before = (copy_of / "metrics.jsonl").read_text()
    shutil.rmtree(copy_of / "checkpoints" / "10")  # killed after logging steps 6..10, before saving 10
    (copy_of / "summary.json").unlink()
    train.train_and_evaluate(small(cache), copy_of)
    rows = [json.loads(line) for line in (copy_of / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in rows if "train/loss" in row]
    assert train_steps == list(range(1, 11))  # 6..10 once, not twice
    assert without_speed((copy_of / "metrics.jsonl").read_text()) == without_speed(before)


def without_speed(text):
    """metrics.jsonl rows without tokens/s (a timing)."""
    return [{k: v for k, v in json.loads(line).items() if "tokens_per_s" not in k} for line in text.splitlines()]


def test_rerunning_a_finished_run_changes_nothing(copy_of, cache, capsys):
    files = {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file()}
    again = train.train_and_evaluate(small(cache), copy_of)
    assert "holds this run, finished (step 10 of 10); nothing to do" in capsys.readouterr().out
    assert again == json.loads((copy_of / "summary.json").read_text())
    assert {p: p.read_bytes() for p in copy_of.rglob("*") if p.is_file()} == files


def test_a_second_run_in_the_same_workdir_is_refused_by_name(tmp_path):
    import socket

    from dora_jax import workdir_lock

    (tmp_path / "run").mkdir()
    lock = {"pid": 1, "host": socket.gethostname(), "since": "2026-11-30 00:00:00"}  # pid 1 is always alive
    (tmp_path / "run" / ".lock").write_text(json.dumps(lock))
    with pytest.raises(ConfigError, match=r"run is in use by another run \(pid 1 on host .* since 2026-11-30"):
        workdir_lock.acquire(tmp_path / "run")
    assert json.loads((tmp_path / "run" / ".lock").read_text()) == lock  # the owner's lock is left alone


def test_a_stale_lock_of_a_finished_process_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from dora_jax import workdir_lock

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    with workdir_lock.held(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_two_runs_building_the_same_base_share_the_winners(tmp_path, monkeypatch):  # its own cache: built here
    from dora_jax import base_model
    from dora_jax import train as train_module

    config = small(tmp_path / "cache")
    target = base_model.synthetic_base_dir(config)

    def the_other_run_wins(pretrain, workdir):
        (pathlib.Path(workdir) / "model").mkdir(parents=True)
        (pathlib.Path(workdir) / "model" / "config.json").write_text('{"ours": true}')
        target.mkdir(parents=True)  # meanwhile the other run renamed its base into place
        (target / "config.json").write_text('{"winner": true}')
        (target / "model.safetensors").write_text("")

    monkeypatch.setattr(train_module, "train_and_evaluate", the_other_run_wins)
    assert base_model.build_synthetic_base(config) == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}


def test_unreadable_data_files_are_named(tmp_path):
    from dora_jax.data.records import DataError, read_records

    (tmp_path / "latin1.json").write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json: not UTF-8 text \(byte 21: invalid continuation byte\)"):
        read_records(tmp_path / "latin1.json")
    with pytest.raises(DataError, match=r": a directory, not a JSON list or JSON Lines file"):
        read_records(tmp_path)


def test_an_export_onto_an_existing_file_is_refused(tmp_path, cache):
    from dora_jax import runs

    config = small(cache)
    config.model.hf_dir = "random"
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(ConfigError, match=r"taken is a file; the export is a directory"):
        runs.place(config).export("peft", tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("configs/nope.py", r"dora_jax.train: config file: .*No such file or directory: 'configs/nope.py'"),
        ("BAD", r"dora_jax.train: config file .*bad.py, line 1: invalid syntax"),
    ],
)
def test_config_files_that_do_not_load_are_one_line_errors(tmp_path, config, message):
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    config = str(tmp_path / "bad.py") if config == "BAD" else config
    argv = [sys.executable, "-m", "dora_jax.train", f"--config={config}", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr[-500:]
    assert not (tmp_path / "run").exists()


def test_a_cutoff_that_leaves_no_response_is_named_before_training(tmp_path):
    from test_commonsense import instruction_file, tiny_instruction_model, word_tokenizer

    from dora_jax.data import commonsense as cs

    path, records = instruction_file(tmp_path)
    tokenizer = word_tokenizer([cs.prompt(r, train=True) for r in records])
    tiny_instruction_model(tmp_path / "base", tokenizer)
    config = run_config.defaults()
    config.model.hf_dir = str(tmp_path / "base")
    config.data.update(source="instruction", path=str(path), cutoff_len=8, val_size=8, eval_batch_size=8)
    config.train.batch_size = 8
    with pytest.raises(ConfigError, match=r"no token to learn from .* data.cutoff_len=8"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path, cache, finished):
    """SIGKILL while training (after step 7 of 10 is logged), then the same command again."""
    import signal
    import subprocess
    import sys
    import time

    root = pathlib.Path(__file__).resolve().parents[1]
    overrides = {"model.base.cache_dir": str(cache), "model.base.steps": 40, "train.steps": 10, "train.batch_size": 16}
    overrides |= {"train.eval_every": 5, "train.log_every": 1, "train.progress_bar": False, "train.warmup_steps": 2}
    overrides |= {"data.eval_batches": 1, "data.eval_batch_size": 32, "checkpoint.every": 5}
    overrides |= {"checkpoint.async_save": False}
    argv = [sys.executable, "-m", "dora_jax.train", "--config=configs/default.py", f"--workdir={tmp_path / 'run'}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    process = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= 7 for line in metrics.read_text().splitlines()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "run" / "summary.json").exists()
    subprocess.run(argv, cwd=root, check=True, capture_output=True, timeout=300)
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / name).read_bytes() == (finished / name).read_bytes()
    assert without_speed(metrics.read_text()) == without_speed((finished / "metrics.jsonl").read_text())
