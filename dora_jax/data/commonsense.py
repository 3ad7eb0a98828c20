"""The commonsense-reasoning suite in the LLM-Adapters format the DoRA paper uses.

A file is a JSON list of records with ``instruction``, ``input``, ``output`` and ``answer``
(e.g. ``{"instruction": "Please answer ... Answer format: true/false", "input": "",
"output": "the correct answer is false", "answer": "false"}``). The prompt texts reproduce the
official training and evaluation templates character for character: they differ in trailing
spaces and in the indentation of blank lines, and adapters trained with the official code only
score right with the exact text.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from dora_jax.data.records import DataError, read_records

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
FIELDS = ("instruction", "input", "output", "answer")
ANSWERS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
RESPONSE_MARK = "### Response:"

_INDENT = " " * 16  # the official templates are indented string literals
_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def load(path: str | pathlib.Path) -> list[dict[str, str]]:
    """The validated records of a JSON list file (or JSON Lines, one record per line)."""
    path = pathlib.Path(path)
    records = read_records(path)
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is {type(record).__name__}, not an object with {list(FIELDS)}")
        for field in FIELDS:
            if field not in record:
                raise DataError(f"{path}: record {index} has no field {field!r} (fields: {sorted(record)})")
            if not isinstance(record[field], str):
                raise DataError(
                    f"{path}: record {index} field {field!r} is {type(record[field]).__name__}, not a string"
                )
    return records


def prompt(record: dict[str, Any], train: bool = False) -> str:
    """The official prompt: with the response for training, up to ``### Response:`` for evaluation."""
    i = _INDENT
    if train:
        if record["input"]:
            return (
                f"{_HEAD_WITH_INPUT} \n\n{i}### Instruction:\n{i}{record['instruction']}\n{i}\n"
                f"{i}### Input:\n{i}{record['input']}\n{i}\n{i}{RESPONSE_MARK}\n{i}{record['output']}"
            )
        return (
            f"{_HEAD}  \n\n{i}### Instruction:\n{i}{record['instruction']}\n{i}\n"
            f"{i}{RESPONSE_MARK}\n{i}{record['output']}"
        )
    if record["input"]:
        return (
            f"{_HEAD_WITH_INPUT}\n\n{i}### Instruction:\n{i}{record['instruction']}\n\n"
            f"{i}### Input:\n{i}{record['input']}\n\n{i}{RESPONSE_MARK}\n{i}"
        )
    return f"{_HEAD} \n\n{i}### Instruction:\n{i}{record['instruction']}\n\n{i}{RESPONSE_MARK}\n{i}"


def response(generated: str) -> str:
    """The part of a decoded generation after the last ``### Response:``, stripped."""
    return generated.split(RESPONSE_MARK)[-1].strip()


def extract_answer(task: str, text: str) -> str:
    """The first answer word of ``task`` found in ``text`` (e.g. ``answer3``), or ``""``."""
    if task not in ANSWERS:
        raise DataError(f"commonsense task {task!r} is unknown; tasks: {list(TASKS)}")
    found = re.findall(ANSWERS[task], text.strip())
    return found[0] if found else ""


def choices(record: dict[str, str], task: str) -> list[str]:
    """The answer words a record offers, from its ``Answer format: a/b/c`` line (or the task's pattern)."""
    found = re.findall(r"Answer format: (\S+)", record["instruction"])
    if found:
        return found[-1].split("/")
    if task not in ANSWERS:
        raise DataError(f"commonsense task {task!r} is unknown; tasks: {list(TASKS)}")
    return ANSWERS[task].split("|")
