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
import jax.numpy as jnp
import numpy as np

from dora_jax import data as data_lib
from dora_jax import generate, io, models, run_config, train
from dora_jax.data import commonsense
from dora_jax.data.instruction import pack_rows
from dora_jax.errors import ConfigError, DoraError
from dora_jax.inject import inject

RESPONSE = "the correct answer is {}"
METHODS = ("loglik", "greedy", "beam")


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


def generate_answers(
    records: list[dict[str, str]],
    task: str,
    tokenizer: Any,
    forward: Any,
    config: Any,
    batch_size: int,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    eos_id: int | None = None,
) -> tuple[list[str], list[str]]:
    """(answers, generated texts): decoding after the evaluation prompt, then ``extract_answer``.

    ``num_beams=1`` decodes greedily; more runs beam search (the official setting is 4 beams,
    32 new tokens).

    Prompts are left-padded to a multiple of 64 tokens so that few shapes are compiled.
    """
    texts = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encoded = [tokenizer.encode(commonsense.prompt(r)).ids for r in chunk]
        width = -(-max(len(e) for e in encoded) // 64) * 64
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :], mask[row, width - len(tokens) :] = tokens, 1
        mask[len(chunk) :, -1] = 1  # filler rows attend to one token
        if num_beams == 1:
            new = generate.greedy(forward, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens)
        else:
            new, _ = generate.beam_search(
                forward, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens, num_beams, eos_id
            )
        texts += [tokenizer.decode(np.asarray(row).tolist(), skip_special_tokens=True) for row in new[: len(chunk)]]
    return [commonsense.extract_answer(task, commonsense.response(t)) for t in texts], texts


def evaluate_run(
    workdir: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    tasks: list[str] | None = None,
    limit: int = 0,
    batch_size: int = 16,
    method: str = "loglik",
) -> dict[str, dict[str, float]]:
    """Accuracy per task of the run in ``workdir`` on ``data_dir/<task>/test.json``; writes the tables.

    ``method``: "loglik" ranks the offered answers by likelihood; "beam" generates up to 32
    tokens with 4 beams and takes the first answer word in them, as the official scoring does;
    "greedy" does the same with greedy decoding.
    """
    workdir, data_dir = pathlib.Path(workdir), pathlib.Path(data_dir)
    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {METHODS}; got {method!r}")
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
    if method != "loglik" and not isinstance(run.model, models.LlamaForCausalLM):
        raise ConfigError(f"--method={method} needs a Llama-family model; this run's is {type(run.model).__name__}")

    def bound(ids, **kwargs):
        return _apply(run, trainable, ids, **kwargs)

    results = {}
    for task in tasks:
        records = commonsense.load(data_dir / task / "test.json")[: limit or None]
        if method != "loglik":
            beams = 4 if method == "beam" else 1
            eos = data_lib.eos_id(pathlib.Path(tokenizer_dir))
            predictions, _ = generate_answers(
                records, task, tokenizer, bound, run.model.config, batch_size, 32, beams, eos
            )
        else:
            predictions = score_records(records, task, tokenizer, score, config.data.cutoff_len, batch_size)
        correct = sum(p == r["answer"] for p, r in zip(predictions, records, strict=True))
        results[task] = {"accuracy": correct / len(records), "correct": correct, "records": len(records)}
    results["average"] = {"accuracy": float(np.mean([results[t]["accuracy"] for t in tasks]))}
    out = workdir / "eval"
    out.mkdir(exist_ok=True)
    (out / "commonsense.json").write_text(json.dumps({"step": step, "method": method, "results": results}, indent=2))
    title = {
        "loglik": "log-likelihood multiple choice",
        "greedy": "greedy generation, first answer word",
        "beam": "beam search with 4 beams, first answer word",
    }[method]
    lines = [
        f"Commonsense accuracy ({title}), step {step}",
        "",
        "| task | accuracy | records |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {results[t]['accuracy']:.4f} | {results[t]['records']} |" for t in tasks]
    lines.append(f"| average | {results['average']['accuracy']:.4f} | |")
    (out / "commonsense.md").write_text("\n".join(lines) + "\n")
    return results


def _apply(run: Any, trainable: Any, ids: jax.Array, **kwargs: Any) -> Any:
    """The run's model on ``ids`` with extra apply arguments (attention mask, positions, cache)."""
    if run.adapter_cfg is None:
        return run.model.apply({"params": trainable}, ids, **kwargs)
    return inject(run.model.apply, run.adapter_cfg)(run.frozen, trainable, ids, **kwargs)


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    workdir = flags.DEFINE_string("workdir", None, "The --workdir of a dora_jax.train run.", required=True)
    data_dir = flags.DEFINE_string("data_dir", None, "Directory with <task>/test.json files.", required=True)
    tasks = flags.DEFINE_list("tasks", [], "Tasks to score (default: every task data_dir holds).")
    limit = flags.DEFINE_integer("limit", 0, "Score only the first N records of each task (0: all).")
    batch_size = flags.DEFINE_integer("batch_size", 16, "Scored sequences (loglik) or prompts (greedy) per batch.")
    method = flags.DEFINE_enum(
        "method", "loglik", list(METHODS), "loglik: rank the answers; beam (official) or greedy: generate."
    )

    def run(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            evaluate_run(workdir.value, data_dir.value, tasks.value, limit.value, batch_size.value, method.value)
        except DoraError as err:
            sys.exit(f"dora_jax.evaluate: {err}")
        print((pathlib.Path(workdir.value) / "eval" / "commonsense.md").read_text())

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
