"""TensorFlow Datasets by name and split, read from a local ``data_dir`` without TensorFlow.

Splits are opened with ``tfds.data_source`` (random access over ArrayRecord files; prepare one
with ``tfds build NAME --file_format=array_record --data_dir=DIR``). The commonsense datasets
become LLM-Adapters records (``to_record``), with the instruction texts of the official
commonsense_170k files character for character, so that a TFDS split trains and scores exactly
like the JSON files of ``dora_jax.data.commonsense``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dora_jax.data.commonsense import DataError

Example = dict[str, Any]


def text(value: Any) -> str:
    """A TFDS text feature as str (ArrayRecord reads give bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _numbered(word: str, texts: Sequence[Any], separator: str = " ") -> str:
    return separator.join(f"{word}{i}: {text(t)}" for i, t in enumerate(texts, start=1))


def _answer_format(word: str, count: int) -> str:
    return "Answer format: " + "/".join(f"{word}{i}" for i in range(1, count + 1))


def _label(example: Example, key: str = "label") -> int:
    label = int(np.asarray(example[key]))
    if label < 0:
        raise DataError(f"example {text(example.get('id', '?'))!r} has no label ({key}={label}): an unlabeled split")
    return label


def _boolq(example: Example) -> dict[str, str]:
    if "answer" in example:  # bool_q: a boolean answer
        answer = "true" if bool(np.asarray(example["answer"])) else "false"
    else:  # super_glue/boolq: ClassLabel names ['False', 'True']
        answer = "true" if _label(example) == 1 else "false"
    question = text(example["question"])
    return _record(
        f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false",
        answer,
    )


def _piqa(example: Example) -> dict[str, str]:
    solutions = [example["sol1"], example["sol2"]]
    instruction = (
        f"Please choose the correct solution to the question: {text(example['goal'])}\n\n"
        f"{_numbered('Solution', solutions, chr(10) * 2)}\n\n{_answer_format('solution', 2)}"
    )
    return _record(instruction, f"solution{_label(example) + 1}")


def _winogrande(example: Example) -> dict[str, str]:
    options = [example["option1"], example["option2"]]
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{text(example['sentence'])}\n\n{_numbered('Option', options)} {_answer_format('option', 2)}"
    )
    return _record(instruction, f"option{_label(example) + 1}")  # ClassLabel names ['1', '2']


def _check_count(what: str, count: int, allowed: range) -> None:
    """The task's answer words (answer1..answer5, ending1..ending4) must cover every offered choice."""
    if count not in allowed:
        raise DataError(f"example offers {count} {what}; the task scores {allowed.start} to {allowed.stop - 1}")


def _multiple_choice(question: str, answers: Sequence[Any], correct: int) -> dict[str, str]:
    _check_count("answers", len(answers), range(2, 6))
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n"
        f"{_numbered('Answer', answers)}\n\n{_answer_format('answer', len(answers))}"
    )
    return _record(instruction, f"answer{correct + 1}")


def _arc(example: Example) -> dict[str, str]:
    labels = [int(x) for x in np.asarray(example["choices"]["label"])]
    key = _label(example, "answerKey")
    if key not in labels:
        raise DataError(f"ARC example {text(example.get('id', '?'))!r}: answerKey {key} is not among labels {labels}")
    return _multiple_choice(text(example["question"]), list(example["choices"]["text"]), labels.index(key))


def _openbookqa(example: Example) -> dict[str, str]:
    question = example["question"]
    answers = [question[f"choice_{letter}"] for letter in "ABCD"]
    return _multiple_choice(text(question["stem"]), answers, _label(example, "answerKey"))


def _hellaswag(example: Example) -> dict[str, str]:
    endings = list(example["endings"])
    _check_count("endings", len(endings), range(4, 5))
    instruction = (
        "Please choose the correct ending to complete the given sentence: "
        f"{text(example['activity_label'])}: {text(example['context'])}\n\n"
        f"{_numbered('Ending', endings)}\n\n{_answer_format('ending', len(endings))}"
    )
    return _record(instruction, f"ending{_label(example) + 1}")


def _record(instruction: str, answer: str) -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


# TFDS name (without version) -> (commonsense task, converter).
COMMONSENSE: dict[str, tuple[str, Callable[[Example], dict[str, str]]]] = {
    "bool_q": ("boolq", _boolq),
    "super_glue/boolq": ("boolq", _boolq),  # needs TensorFlow installed to open
    "piqa": ("piqa", _piqa),
    "winogrande": ("winogrande", _winogrande),
    "ai2_arc/ARC-Easy": ("ARC-Easy", _arc),
    "ai2_arc/ARC-Challenge": ("ARC-Challenge", _arc),
    "openbookqa": ("openbookqa", _openbookqa),
    "hellaswag": ("hellaswag", _hellaswag),
}


# Builders TFDS registers only when their module is imported (they need no TensorFlow to read).
_MODULES = {
    "hellaswag": "tensorflow_datasets.text.hellaswag",
    "winogrande": "tensorflow_datasets.text.winogrande",
    "glue": "tensorflow_datasets.text.glue",
}


def base_name(name: str) -> str:
    """``name`` without its ``:version`` suffix (``piqa:1.0.0`` -> ``piqa``)."""
    return name.split(":", 1)[0]


def commonsense_task(name: str) -> str:
    """The commonsense task a TFDS name holds (``ai2_arc/ARC-Easy`` -> ``ARC-Easy``)."""
    if base_name(name) not in COMMONSENSE:
        raise DataError(f"TFDS dataset {name!r} has no commonsense record format; supported: {sorted(COMMONSENSE)}")
    return COMMONSENSE[base_name(name)][0]


def load_split(name: str, split: str, data_dir: str = "", limit: int = 0) -> Sequence[Example]:
    """Random-access examples of a prepared TFDS split (the first ``limit`` as a list when > 0).

    Errors name the dataset, the split and the data_dir.
    """
    import importlib

    import tensorflow_datasets as tfds

    module = _MODULES.get(base_name(name).split("/")[0])
    if module:
        importlib.import_module(module)
    where = data_dir or "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    try:
        examples = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as err:  # TFDS raises several types (not found, not prepared, bad split, file format)
        raise DataError(
            f"TFDS {name!r} split {split!r} could not be opened from data_dir {where}: {type(err).__name__}: {err}. "
            f"Prepare it there with: tfds build {base_name(name)} --file_format=array_record"
            + (f" --data_dir={data_dir}" if data_dir else "")
        ) from None
    return examples if limit <= 0 else [examples[i] for i in range(min(limit, len(examples)))]


def to_record(name: str, example: Example) -> dict[str, str]:
    """The LLM-Adapters record (instruction, input, output, answer) of one TFDS example."""
    commonsense_task(name)
    return COMMONSENSE[base_name(name)][1](example)


def load_records(name: str, split: str, data_dir: str = "", limit: int = 0) -> list[dict[str, str]]:
    """The LLM-Adapters records of a TFDS split (the first ``limit`` when > 0)."""
    commonsense_task(name)
    examples = load_split(name, split, data_dir, limit)
    return [to_record(name, examples[i]) for i in range(len(examples))]
