"""Sentence classification with an encoder: files, TFDS, tokenised batches, DoRA + head training, F1."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_models_hf import minilm_dir

from conftest import load_config
from dora_jax import data, io, metrics, run_config, runs, train
from dora_jax.data import classification
from dora_jax.data.commonsense import DataError
from dora_jax.errors import ConfigError

GOOD = ["a gripping film", "warm and funny", "a joy to watch", "smart and moving", "great acting"]
BAD = ["a dull mess", "boring and long", "a waste of time", "flat and lifeless", "poor acting"]


def sentiment_records(repeat=4):
    labelled = [(text, 1) for text in GOOD] + [(text, 0) for text in BAD]
    return [{"text": f"{text} {i}", "label": label} for i in range(repeat) for text, label in labelled]


def tokenizer():
    return io.load_tokenizer(minilm_dir())


def test_single_texts_and_pairs_encode_with_cls_sep_and_segments():
    (single, single_types), (pair, pair_types) = classification.encode_all(
        [{"text": "a gripping film", "label": 1}, {"text": "is it good", "text_pair": "yes it is", "label": 0}],
        tokenizer(),
        max_len=16,
    )
    assert single == [101, 1037, 13940, 2143, 102] and single_types == [0] * 5
    assert pair == [101, 2003, 2009, 2204, 102, 2748, 2009, 2003, 102]
    assert pair_types == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_long_pairs_are_cut_longest_first_to_max_len():
    record = {"text": "one two three four five six seven eight", "text_pair": "yes", "label": 0}
    ((ids, types),) = classification.encode_all([record], tokenizer(), max_len=8)
    assert len(ids) == 8 and ids[0] == 101 and ids[-1] == 102 and types.count(1) == 2  # "yes [SEP]" kept whole


def test_batches_are_padded_masked_deterministic_and_host_sharded():
    source = classification.ClassificationSource(sentiment_records(), "mem", tokenizer(), 12, 2, 0, 8, 8)
    assert len(source.train) == 32 and len(source.val) == 8
    batch = source.batch(0, 8)
    assert batch["inputs"].shape == (8, 12) and batch["labels"].shape == (8,)
    np.testing.assert_array_equal(batch["attention_mask"], batch["inputs"] != 0)
    assert batch["loss_mask"].tolist() == [1.0] * 8
    halves = [source.batch(5, 8, host, 2) for host in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), source.batch(5, 8)["inputs"])
    again = classification.ClassificationSource(sentiment_records(), "mem", tokenizer(), 12, 2, 0, 8, 8)
    np.testing.assert_array_equal(again.batch(3, 8)["labels"], source.batch(3, 8)["labels"])
    (evaluation,) = source.eval_batches()
    assert evaluation["loss_mask"].sum() == 8


def test_unicode_text_round_trips_through_a_jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "Grüße, 世界", "label": 1}, ensure_ascii=False) + "\n\n")
    assert classification.load_file(path) == [{"text": "Grüße, 世界", "label": 1}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok", "label": 0}\n{"text": "bad"', r"train.jsonl:2: not valid JSON"),
        (
            '{"text": "ok", "label": 0}\n{"label": 1}',
            r"train.jsonl: record 1 has no field 'text' \(fields: \['label'\]\)",
        ),
        ('{"text": "ok", "label": "1"}', r"train.jsonl: record 0 field 'label' is str, not int"),
        ('{"text": "ok", "label": -1}', r"train.jsonl: record 0 field 'label' is -1: labels are 0, 1, ..."),
    ],
)
def test_bad_records_name_the_file_the_line_or_record_and_the_field(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        classification.load_file(path)


def test_json_list_errors_name_the_record_index(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "ok", "label": 0}, {"text": "no label"}]))
    with pytest.raises(DataError, match=r"train.json: record 1 has no field 'label'"):
        classification.load_file(path)


def test_label_beyond_num_labels_is_refused():
    with pytest.raises(DataError, match=r"mem: record 0 has label 2, but model.num_labels=2 \(labels 0..1\)"):
        classification.ClassificationSource([{"text": "x", "label": 2}] * 4, "mem", tokenizer(), 8, 2, 0, 1, 8)


@pytest.mark.parametrize("name", sorted(classification.TFDS_TASKS))
def test_tfds_classification_datasets_become_records(name):
    with tfds.testing.mock_data(num_examples=5):
        records = classification.load_tfds(name, "train")
    pair = len(classification.TFDS_TASKS[name][0]) == 2
    assert len(records) == 5 and all(("text_pair" in r) == pair for r in records)
    assert all(0 <= r["label"] < classification.num_labels(name) for r in records)


def test_metrics_give_accuracy_macro_f1_and_positive_f1():
    logits = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    batch = {"labels": jnp.asarray([0, 1, 0, 1, 0]), "loss_mask": jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0])}
    summary = metrics.classification_summary(metrics.classification_metrics(logits, batch))
    # rows 0-3: predicted 0,1,1,0 for labels 0,1,0,1 -> class 1: tp 1, fp 1, fn 1; class 0 the same
    assert summary["accuracy"] == 0.5 and summary["f1"] == 0.5 and summary["macro_f1"] == 0.5
    expected_nll = -np.mean(np.log(jax.nn.softmax(logits[:4], -1))[np.arange(4), [0, 1, 0, 1]])
    np.testing.assert_allclose(summary["loss"], expected_nll, rtol=1e-6)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """DoRA r=8 on every linear layer of the real MiniLM-L6 encoder, with a new two-label head."""
    root = tmp_path_factory.mktemp("classify")
    (root / "train.json").write_text(json.dumps(sentiment_records(6)))
    c = run_config.defaults()
    c.model.update(hf_dir=str(minilm_dir()), num_labels=2)
    c.adapter.targets = r".*/encoder/.*/kernel"
    c.data.update(source="classification", path=str(root / "train.json"), cutoff_len=12, val_size=12)
    c.data.eval_batch_size = 12
    c.train.update(steps=20, batch_size=16, learning_rate=1e-2, warmup_steps=2, eval_every=20, progress_bar=False)
    c.export.merged = True
    c.checkpoint.async_save = False
    summary = train.train_and_evaluate(c, root / "run")
    return root, summary


def test_dora_with_a_trained_head_learns_a_separable_task(classifier_run):
    _, summary = classifier_run
    assert summary["before"]["accuracy"] <= 0.75 and summary["after"]["accuracy"] == 1.0
    assert summary["after"]["macro_f1"] == 1.0 and summary["after"]["loss"] < summary["before"]["loss"]


def run_and_torch_logits(root, load_hf_model):
    """(our logits, the torch model's logits) of the run's evaluation batch."""
    torch = pytest.importorskip("torch")
    run = runs.load(root / "run")
    batch = data.make_source(run.config).eval_batches()[0]
    ours = runs.make_forward(run.model, run.adapter_cfg)(run.trainable, run.frozen, batch, None)
    with torch.no_grad():
        theirs = (
            load_hf_model()
            .eval()(**{key: torch.tensor(batch[name], dtype=torch.long) for key, name in TORCH_INPUTS})
            .logits.numpy()
        )
    return np.asarray(ours), theirs


TORCH_INPUTS = (("input_ids", "inputs"), ("attention_mask", "attention_mask"), ("token_type_ids", "token_type_ids"))


def test_merged_export_is_a_transformers_classifier_with_the_runs_logits(classifier_run):
    transformers = pytest.importorskip("transformers")
    root, _ = classifier_run
    ours, theirs = run_and_torch_logits(
        root, lambda: transformers.BertForSequenceClassification.from_pretrained(root / "run" / "merged")
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_peft_export_carries_the_head_as_modules_to_save(classifier_run):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root, _ = classifier_run
    config = json.loads((root / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"

    def load():
        base = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        return peft.PeftModel.from_pretrained(base, root / "run" / "adapter")

    ours, theirs = run_and_torch_logits(root, load)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_exported_classifier_adapter_imports_back_with_its_head(classifier_run):
    root, _ = classifier_run
    run = runs.load(root / "run")
    adapters, head = run.trainable["adapters"], run.head
    imported, cfg = io.import_peft(root / "run" / "adapter", run.params(), model=run.model)
    assert cfg.method == "dora" and cfg.rank == run.adapter_cfg.rank
    jax.tree.map(np.testing.assert_array_equal, imported, jax.device_get(adapters))
    jax.tree.map(np.testing.assert_array_equal, io.read_peft_head(root / "run" / "adapter"), jax.device_get(head))


def test_classification_needs_num_labels_and_a_fitting_model(tmp_path):
    c = run_config.defaults()
    c.data.update(source="classification", path=str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match=r"needs model.num_labels > 0 \(e.g. 2 for glue/sst2\)"):
        train.build(c)


def test_evaluate_command_scores_a_classifier_run_on_a_labelled_file(classifier_run):
    from dora_jax import evaluate

    root, summary = classifier_run
    path = root / "test.jsonl"
    records = [{"text": f"{t} again", "label": 1} for t in GOOD] + [{"text": f"{t} again", "label": 0} for t in BAD]
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(SystemExit) as exited:  # absl's app.run exits
        evaluate.main(["evaluate", f"--workdir={root / 'run'}", f"--data_path={path}", "--batch_size=4"])
    assert exited.value.code in (None, 0)
    stored = json.loads((root / "run" / "eval" / "classification.json").read_text())
    assert stored["results"]["records"] == 10 and stored["step"] == summary["step"]
    assert stored["results"]["accuracy"] == 1.0 and stored["results"]["macro_f1"] == 1.0
    assert "| accuracy | 1.0000 |" in (root / "run" / "eval" / "classification.md").read_text()
    with pytest.raises(ConfigError, match="give exactly one of --data_path"):
        evaluate.evaluate_classifier(root / "run")


def test_evaluate_scores_the_runs_exported_adapter_like_the_run(classifier_run):
    """--adapter=<the run's PEFT export> --base=<the encoder>: the same accuracy and F1 as the run."""
    from dora_jax import evaluate

    root, _ = classifier_run
    path = root / "test_adapter.jsonl"  # the records of the test above: the run's eval/ tables stay the same
    records = [{"text": f"{t} again", "label": 1} for t in GOOD] + [{"text": f"{t} again", "label": 0} for t in BAD]
    path.write_text("\n".join(json.dumps(r) for r in records))
    from_run = evaluate.evaluate_classifier(root / "run", str(path), batch_size=4)
    evaluate.evaluate_classifier(  # what `evaluate --adapter=DIR --base=DIR --data_path=FILE` runs
        root / "adapter_eval",
        str(path),
        batch_size=4,
        adapter_dir=root / "run" / "adapter",
        base_dir=minilm_dir(),
        cutoff_len=12,
    )
    from_adapter = json.loads((root / "adapter_eval" / "eval" / "classification.json").read_text())["results"]
    assert from_adapter == pytest.approx(from_run, rel=1e-6)


@pytest.mark.parametrize("task", ["sst2", "mrpc", "mnli", "bool_q"])
def test_glue_configs_are_valid_and_refuse_to_start_without_the_encoder(tmp_path, task):
    c = load_config("configs/glue.py", task)
    run_config.check(c)
    assert c.model.num_labels == (3 if task == "mnli" else 2)
    with pytest.raises(ConfigError, match=r"model.hf_dir is not set"):
        train.train_and_evaluate(c, tmp_path)


def test_boolq_records_become_question_classification_records(tmp_path):
    def record(question, answer):
        instruction = f"Please answer with true or false, question: {question}\n\nAnswer format: true/false"
        return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}

    path = tmp_path / "train.json"
    path.write_text(json.dumps([record("is the sky blue?", "true"), record("do fish walk?", "false")]))
    assert classification.boolq_questions(path) == [
        {"text": "is the sky blue?", "label": 1},
        {"text": "do fish walk?", "label": 0},
    ]
    path.write_text(json.dumps([record("is it?", "true"), {**record("x?", "true"), "answer": "option1"}]))
    with pytest.raises(DataError, match=r"train.json: record 1 is not a BoolQ record"):
        classification.boolq_questions(path)
