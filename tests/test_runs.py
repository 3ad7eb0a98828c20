"""A loaded run: one shape (model, what trains, mesh) for training, scoring and export, from any source."""

import jax
import numpy as np
import pytest
from test_train import small

from dora_jax import base_model, data, metrics, models, optim, run_config, runs, train
from dora_jax.errors import ConfigError
from dora_jax.io.checkpoints import Checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir, summary) of one small DoRA run, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    config = small(root / "cache")
    summary = train.train_and_evaluate(config, root / "run")
    return config, root / "run", summary


def evaluation(run, config=None):
    """The run's metrics over the evaluation batches of ``config`` (default: its own), as training reports them."""
    score, totals = run.scorer(metrics.lm_metrics), None
    for batch in data.make_source(config or run.config).eval_batches():
        sums = score(batch)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return metrics.summarise(totals)


def test_the_run_that_builds_the_base_records_its_own_config(trained):
    # The base is pretrained on model.base.task ("copy"); the run adapts to data.task ("shift").
    config, workdir, _ = trained
    assert config.data.task == "shift" and runs.read_config(workdir).data.task == "shift"


def test_a_loaded_run_scores_what_training_scored(trained):
    _, workdir, summary = trained
    run = runs.load(workdir)
    assert run.step == 10 and run.adapter_cfg.method == "dora"
    assert evaluation(run) == summary["after"]


def test_loading_a_run_reads_no_data_and_builds_no_optimizer(trained, monkeypatch, tmp_path):
    _, workdir, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("loading a run to score or export it must not need this")

    monkeypatch.setattr(data, "make_source", refuse)
    monkeypatch.setattr(optim, "make_optimizer", refuse)
    run = runs.load(workdir)
    run.export("merged", tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()


def test_a_peft_adapter_over_its_base_is_the_run_it_came_from(trained):
    config, workdir, summary = trained
    run = runs.load_adapter(workdir / "adapter", base_model.synthetic_base_dir(config))
    jax.tree.map(np.testing.assert_array_equal, run.trainable, runs.load(workdir).trainable)
    np.testing.assert_allclose(evaluation(run, config)["loss"], summary["after"]["loss"], rtol=1e-6)


def test_a_checkpoint_of_the_earlier_layout_loads_but_does_not_resume(trained, tmp_path):
    # Before {"adapters", "params"} a DoRA run's checkpoint held the adapters alone.
    config, workdir, _ = trained
    current = runs.load(workdir)
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    earlier = Checkpoints(tmp_path / "checkpoints", keep=1, async_save=False)
    adapters = current.trainable["adapters"]
    earlier.save(10, {"step": np.int32(10), "trainable": adapters, "opt_state": {"mu": adapters}}, {"seed": 0})
    earlier.close()
    jax.tree.map(np.testing.assert_array_equal, runs.load(tmp_path).trainable, current.trainable)
    with pytest.raises(ConfigError, match=r"step 10 was written by an earlier dora_jax .* train in a new --workdir"):
        train.train_and_evaluate(config, tmp_path)


def test_full_fine_tuning_trains_every_weight_and_freezes_none(trained):
    config, _, _ = trained
    config = run_config.from_flat({**run_config.flat(config), "train.finetune": "full"})
    run = runs.place(config)
    assert run.adapter_cfg is None and run.trainable["adapters"] is None
    assert jax.tree.leaves(run.frozen) == [] and train.count_params(run.trainable) == 100_672


def test_a_classifier_trains_its_new_head_next_to_the_adapters():
    model = models.from_hf_config(
        dict(
            model_type="bert",
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            id2label={0: "no", 1: "yes"},
            architectures=["BertForSequenceClassification"],
        )
    )
    params = models.abstract_params(model)
    mask = runs.what_trains(model, params, "adapter")
    trained = {"/".join(k.key for k in path) for path, keep in jax.tree_util.tree_leaves_with_path(mask) if keep}
    assert trained == {"classifier/kernel", "classifier/bias"}
    assert all(jax.tree.leaves(runs.what_trains(model, params, "full")))
