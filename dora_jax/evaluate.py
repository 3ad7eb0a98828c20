"""Commonsense evaluation of a training run by log-likelihood multiple choice.

    python -m dora_jax.evaluate --workdir=RUN --data_dir=DIR [--tasks=boolq,piqa] [--limit=N]

For each test record, every answer the record offers (its ``Answer format: a/b/c`` line) is
scored as the response ``the correct answer is <a>`` after the official evaluation prompt; the
prediction is the answer with the highest summed log-probability, and a task's score is the
accuracy. This ranks the same completions the official generation-based scoring (beam search,
first answer word in the text) looks for, without generating. Per-task tables go to
``RUN/eval/commonsense.md`` and ``.json``.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from dora_jax import io, run_config, train
from dora_jax.data import commonsense
from dora_jax.data.instruction import pack_rows
from dora_jax.errors import ConfigError, DoraError

RESPONSE = "the correct answer is {}"


def sequence_logprobs(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Summed log-probability of each row's loss-masked target tokens: (rows,)."""
    return (train.token_logprobs(logits, batch["targets"]) * batch["loss_mask"]).sum(-1)


def candidate_rows(
    record: dict[str, str], task: str, tokenizer: Any, cutoff_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, scored flags) of the prompt followed by each candidate response, keeping the last tokens."""
    prompt = commonsense.prompt(record)
    prompt_len = len(tokenizer.encode(prompt).ids)
    rows = []
    for choice in commonsense.choices(record, task):
        ids = np.asarray(tokenizer.encode(prompt + RESPONSE.format(choice)).ids, np.int32)
        scored = np.arange(len(ids)) >= prompt_len
        rows.append((ids[-cutoff_len:], scored[-cutoff_len:]))
    return rows


def score_records(
    records: list[dict[str, str]], task: str, tokenizer: Any, score_fn: Any, cutoff_len: int, batch_size: int
) -> list[str]:
    """The predicted answer of each record: the candidate with the highest log-likelihood."""
    rows, owners = [], []
    for index, record in enumerate(records):
        for row in candidate_rows(record, task, tokenizer, cutoff_len):
            rows.append(row)
            owners.append(index)
    scores = []
    filler = (np.zeros(1, np.int32), np.zeros(1, bool))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = pack_rows(chunk + [filler] * (batch_size - len(chunk)), cutoff_len - 1)
        scores.extend(np.asarray(score_fn(batch))[: len(chunk)].tolist())
    predictions = []
    for index, record in enumerate(records):
        options = commonsense.choices(record, task)
        mine = [s for s, owner in zip(scores, owners, strict=True) if owner == index]
        predictions.append(options[int(np.argmax(mine))])
    return predictions


def evaluate_run(
    workdir: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    tasks: list[str] | None = None,
    limit: int = 0,
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Accuracy per task of the run in ``workdir`` on ``data_dir/<task>/test.json``; writes the tables."""
    workdir, data_dir = pathlib.Path(workdir), pathlib.Path(data_dir)
    tasks = tasks or [t for t in commonsense.TASKS if (data_dir / t / "test.json").exists()]
    unknown = [t for t in tasks if t not in commonsense.TASKS]
    if unknown:
        raise ConfigError(f"--tasks {unknown} are unknown; tasks: {list(commonsense.TASKS)}")
    if not tasks:
        raise ConfigError(f"{data_dir}: holds no <task>/test.json of {list(commonsense.TASKS)}")
    run, trainable, step = train.restore_latest(workdir)
    config = run.config
    tokenizer_dir = config.data.tokenizer_dir or run_config.require_path("model.hf_dir", config.model.hf_dir)
    tokenizer = io.load_tokenizer(tokenizer_dir)
    forward = train.make_forward(run.model, run.adapter_cfg)
    score = jax.jit(lambda batch: sequence_logprobs(forward(trainable, run.frozen, batch["inputs"], None), batch))
    results = {}
    for task in tasks:
        records = commonsense.load(data_dir / task / "test.json")[: limit or None]
        predictions = score_records(records, task, tokenizer, score, config.data.cutoff_len, batch_size)
        correct = sum(p == r["answer"] for p, r in zip(predictions, records, strict=True))
        results[task] = {"accuracy": correct / len(records), "correct": correct, "records": len(records)}
    results["average"] = {"accuracy": float(np.mean([results[t]["accuracy"] for t in tasks]))}
    out = workdir / "eval"
    out.mkdir(exist_ok=True)
    (out / "commonsense.json").write_text(json.dumps({"step": step, "results": results}, indent=2))
    lines = [
        f"Commonsense accuracy (log-likelihood multiple choice), step {step}",
        "",
        "| task | accuracy | records |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {results[t]['accuracy']:.4f} | {results[t]['records']} |" for t in tasks]
    lines.append(f"| average | {results['average']['accuracy']:.4f} | |")
    (out / "commonsense.md").write_text("\n".join(lines) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    workdir = flags.DEFINE_string("workdir", None, "The --workdir of a dora_jax.train run.", required=True)
    data_dir = flags.DEFINE_string("data_dir", None, "Directory with <task>/test.json files.", required=True)
    tasks = flags.DEFINE_list("tasks", [], "Tasks to score (default: every task data_dir holds).")
    limit = flags.DEFINE_integer("limit", 0, "Score only the first N records of each task (0: all).")
    batch_size = flags.DEFINE_integer("batch_size", 16, "Scored sequences per batch.")

    def run(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            evaluate_run(workdir.value, data_dir.value, tasks.value, limit.value, batch_size.value)
        except DoraError as err:
            sys.exit(f"dora_jax.evaluate: {err}")
        print((pathlib.Path(workdir.value) / "eval" / "commonsense.md").read_text())

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
