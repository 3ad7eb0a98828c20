"""TFDS sources: splits read from a local data_dir (no TensorFlow), LLM-Adapters records, errors."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_commonsense import SHARED, tiny_instruction_model, word_tokenizer

from dora_jax import data as data_lib
from dora_jax import run_config, train
from dora_jax.data import commonsense as cs
from dora_jax.data import tfds_source

PIQA_EXAMPLES = [
    {"id": str(i), "goal": f"How to dry item {i} ?", "sol1": "use a towel", "sol2": "use water", "label": i % 2}
    for i in range(24)
]


class _PreparedPiqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ``PIQA_EXAMPLES`` as a prepared ``piqa`` 1.0.0 train split: TFDS's own piqa reads it back."""

    name = "piqa"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        text = tfds.features.Text()
        features = {"id": text, "goal": text, "sol1": text, "sol2": text}
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({**features, "label": tfds.features.ClassLabel(num_classes=2)}),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for example in PIQA_EXAMPLES:
            yield example["id"], example


@pytest.fixture(scope="module")
def piqa_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    _PreparedPiqa(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return directory


def test_prepared_split_is_read_from_data_dir_as_records(piqa_dir):
    records = tfds_source.load_records("piqa", "train", str(piqa_dir))
    by_goal = {r["instruction"].split("question: ")[1].split("\n")[0]: r for r in records}
    assert len(records) == 24 and len(by_goal) == 24
    record = by_goal["How to dry item 3 ?"]
    assert record == {
        "instruction": "Please choose the correct solution to the question: How to dry item 3 ?\n\n"
        "Solution1: use a towel\n\nSolution2: use water\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": "the correct answer is solution2",
        "answer": "solution2",
    }
    assert len(tfds_source.load_records("piqa", "train", str(piqa_dir), limit=5)) == 5


def test_unknown_dataset_error_names_the_tfds_error_and_the_data_dir(tmp_path):
    where = re.escape(str(tmp_path))
    with pytest.raises(cs.DataError, match=rf"'no_such_set'.*data_dir {where}: DatasetNotFoundError"):
        tfds_source.load_split("no_such_set", "train", str(tmp_path))


def test_missing_split_error_names_the_split_and_the_data_dir(piqa_dir):
    with pytest.raises(cs.DataError, match=rf"split 'validation' could not be opened from data_dir {piqa_dir}"):
        tfds_source.load_split("piqa", "validation", str(piqa_dir))


def test_dataset_without_record_format_lists_the_supported_ones():
    with pytest.raises(cs.DataError, match=r"'glue/sst2' has no commonsense record format; supported: .*'piqa'"):
        tfds_source.load_records("glue/sst2", "train")


def test_unlabeled_example_is_refused():
    example = {"activity_label": "x", "context": "y", "endings": ["a", "b", "c", "d"], "label": -1}
    with pytest.raises(cs.DataError, match=r"no label \(label=-1\): an unlabeled split"):
        tfds_source.to_record("hellaswag", example)


def _four_choices(example):
    """A mock example with its random-length choice list cut to four, the answer among them."""
    if "choices" in example:  # ARC: labels are the ClassLabel ints A-E
        return {**example, "choices": {"text": example["choices"]["text"][:4], "label": np.arange(4)}, "answerKey": 2}
    if "endings" in example:  # hellaswag
        return {**example, "endings": example["endings"][:4], "label": 3}
    return example


# super_glue needs TensorFlow to open (bool_q holds the same data without it); its label form is
# covered by the character-for-character test on the real BoolQ files below.
@pytest.mark.parametrize("name", sorted(set(tfds_source.COMMONSENSE) - {"super_glue/boolq"}))
def test_every_supported_datasets_features_convert_to_records_whose_answer_the_task_extracts(name):
    """Mock examples have each builder's real feature names and types (``tfds.testing.mock_data``)."""
    with tfds.testing.mock_data(num_examples=6):
        examples = tfds_source.load_split(name, "train")
        examples = [_four_choices(examples[i]) for i in range(len(examples))]
    task = tfds_source.commonsense_task(name)
    assert len(examples) == 6
    for record in map(lambda example: tfds_source.to_record(name, example), examples):
        assert cs.extract_answer(task, record["output"]) == record["answer"]
        assert record["answer"] in cs.choices(record, task)
        listed = re.findall(r"(\w+?\d): ", record["instruction"].lower())  # Solution1: ... Answer4: ...
        assert listed == ([] if task == "boolq" else cs.choices(record, task))


def test_choices_beyond_the_tasks_answer_words_are_refused():
    example = {"question": "q", "choices": {"text": list("abcdef"), "label": np.arange(6)}, "answerKey": 0}
    with pytest.raises(cs.DataError, match="offers 6 answers; the task scores 2 to 5"):
        tfds_source.to_record("ai2_arc/ARC-Easy", example)


def _parsed(task, record):
    """The TFDS example a real record was made from, recovered from its instruction text."""
    text = record["instruction"]
    label = int(re.sub(r"\D", "", record["answer"]) or 0) - 1
    if task == "boolq":
        question = re.fullmatch(r".*?question: (.*)\?\n\nAnswer format: true/false", text, re.S).group(1)
        return "super_glue/boolq", {"question": question, "label": int(record["answer"] == "true")}
    if task == "piqa":
        pattern = r".*?question: (.*)\n\nSolution1: (.*)\n\nSolution2: (.*)\n\n.*"
        goal, sol1, sol2 = re.fullmatch(pattern, text, re.S).groups()
        return "piqa", {"goal": goal, "sol1": sol1, "sol2": sol2, "label": label}
    if task == "winogrande":
        pattern = r".*?sentence: (.*)\n\nOption1: (.*) Option2: (.*) Answer.*"
        sentence, one, two = re.fullmatch(pattern, text, re.S).groups()
        return "winogrande", {"sentence": sentence, "option1": one, "option2": two, "label": label}
    question, body = re.fullmatch(r".*?question: (.*)\n\n(Answer1: .*)\n\nAnswer format: \S+", text, re.S).groups()
    answers = re.split(r"(?:^| )Answer\d: ", body)[1:]
    if task == "openbookqa":
        choices = {f"choice_{letter}": answer for letter, answer in zip("ABCD", answers, strict=True)}
        return "openbookqa", {"question": {"stem": question, **choices}, "answerKey": label}
    return f"ai2_arc/{task}", {
        "question": question,
        "choices": {"text": answers, "label": np.arange(len(answers))},
        "answerKey": label,
    }


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/commonsense is absent")
@pytest.mark.parametrize("task", ["boolq", "piqa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"])
def test_records_reproduce_the_official_files_character_for_character(task):
    for path in sorted((SHARED / task).glob("*.json")):
        for record in cs.load(path):
            name, example = _parsed(task, record)
            assert tfds_source.to_record(name, example) == record


def test_tfds_source_trains_like_an_instruction_file(tmp_path, piqa_dir):
    records = tfds_source.load_records("piqa", "train", str(piqa_dir))
    tokenizer = word_tokenizer([cs.prompt(r, train=True) for r in records])
    tiny_instruction_model(tmp_path / "base", tokenizer)
    c = run_config.defaults()
    c.model.hf_dir = str(tmp_path / "base")
    c.data.update(source="tfds", tfds_name="piqa", tfds_data_dir=str(piqa_dir), cutoff_len=64, val_size=8)
    c.data.eval_batch_size = 8
    source = data_lib.make_source(c)
    assert len(source.train) == 16 and source.origin == "TFDS piqa split train"
    c.train.update(epochs=1, batch_size=8, eval_every=2, progress_bar=False, warmup_steps=1)
    c.checkpoint.async_save = False
    summary = train.train_and_evaluate(c, tmp_path / "run")
    assert summary["steps"] == 2 and summary["after"]["loss"] < summary["before"]["loss"]
