"""Commonsense evaluation of a training run: accuracy by likelihood or generation, and perplexity.

    python -m dora_jax.evaluate --workdir=RUN --data_dir=DIR [--tasks=boolq,piqa] [--limit=N]
    python -m dora_jax.evaluate --workdir=RUN --tfds=piqa,ai2_arc/ARC-Easy --tfds_data_dir=DIR
    python -m dora_jax.evaluate --workdir=RUN --data_dir=DIR --method=beam|greedy|perplexity
    python -m dora_jax.evaluate --workdir=OUT --adapter=PEFT_DIR --base=HF_DIR --data_dir=DIR
    python -m dora_jax.evaluate --workdir=RUN --data_path=FILE     # a classifier run (or --tfds=glue/sst2)
    python -m dora_jax.evaluate --workdir=OUT --adapter=SEQ_CLS_DIR --base=ENCODER_DIR --data_path=FILE

``--method=loglik`` (default): every answer a record offers (its ``Answer format: a/b/c`` line)
is scored as the response ``the correct answer is <a>`` after the official evaluation prompt;
the prediction is the answer with the highest summed log-probability. This ranks the same
completions the official generation-based scoring (``--method=beam``: 4 beams, 32 new tokens,
first answer word in the text) looks for, without generating. Per-task tables go to
``RUN/eval/commonsense.md`` and ``.json``.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import data as data_lib
from dora_jax import io, models, parallel, runs, scoring
from dora_jax import metrics as metrics_lib
from dora_jax.data import commonsense, tfds_source
from dora_jax.errors import ConfigError, DoraError

METHODS = ("loglik", "greedy", "beam", "perplexity")


def task_records(
    data_dir: str | pathlib.Path | None = None,
    tasks: list[str] | None = None,
    tfds_names: list[str] | None = None,
    tfds_split: str = "validation",
    tfds_data_dir: str = "",
    limit: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """Test records per task: ``data_dir/<task>/test.json`` files or TFDS splits (e.g. ``piqa``)."""
    if tfds_names:
        out = {}
        for name in tfds_names:
            out[tfds_source.commonsense_task(name)] = tfds_source.load_records(name, tfds_split, tfds_data_dir, limit)
        return out
    if data_dir is None:
        raise ConfigError("give --data_dir (files <task>/test.json) or --tfds (dataset names)")
    data_dir = pathlib.Path(data_dir)
    tasks = tasks or [t for t in commonsense.TASKS if (data_dir / t / "test.json").exists()]
    unknown = [t for t in tasks if t not in commonsense.TASKS]
    if unknown:
        raise ConfigError(f"--tasks {unknown} are unknown; tasks: {list(commonsense.TASKS)}")
    if not tasks:
        raise ConfigError(f"{data_dir}: holds no <task>/test.json of {list(commonsense.TASKS)}")
    return {task: commonsense.load(data_dir / task / "test.json")[: limit or None] for task in tasks}


def load(workdir: Any, adapter_dir: Any = None, base_dir: Any = None, cutoff_len: int = 256) -> runs.LoadedRun:
    """The run scored: the latest checkpoint in ``workdir``, or a PEFT adapter over ``base_dir``."""
    if not adapter_dir:
        return runs.load(workdir)
    if not base_dir:
        raise ConfigError("--adapter needs --base: the HF directory of the model the adapter was trained on")
    return runs.load_adapter(adapter_dir, base_dir, cutoff_len)


def evaluate_run(
    workdir: str | pathlib.Path,
    data_dir: str | pathlib.Path | None = None,
    tasks: list[str] | None = None,
    limit: int = 0,
    batch_size: int = 16,
    method: str = "loglik",
    tfds_names: list[str] | None = None,
    tfds_split: str = "validation",
    tfds_data_dir: str = "",
    adapter_dir: str | pathlib.Path | None = None,
    base_dir: str | pathlib.Path | None = None,
    cutoff_len: int = 256,
) -> dict[str, dict[str, float]]:
    """Scores the run in ``workdir`` on each task's test records; writes ``eval/commonsense.{md,json}``.

    ``method``: "loglik" ranks the offered answers by likelihood; "beam" generates up to 32
    tokens with 4 beams and takes the first answer word in them, as the official scoring does;
    "greedy" does the same with greedy decoding; "perplexity" is exp(mean NLL) of the gold
    responses (the tokens the run trained on). Records come from ``data_dir/<task>/test.json``
    or from the TFDS datasets ``tfds_names``. Scoring batches are sharded over the run's mesh.
    With ``adapter_dir`` and ``base_dir`` it scores a PEFT adapter instead of a run (``workdir``
    then only receives the tables; ``cutoff_len`` bounds the scored sequences).
    """
    workdir = pathlib.Path(workdir)
    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {METHODS}; got {method!r}")
    records_by_task = task_records(data_dir, tasks, tfds_names, tfds_split, tfds_data_dir, limit)
    run = load(workdir, adapter_dir, base_dir, cutoff_len)
    config = run.config
    parallel.check_batch(batch_size, run.mesh, "--batch_size")
    tokenizer_dir = data_lib.tokenizer_dir(config)
    tokenizer = io.load_tokenizer(tokenizer_dir)
    eos = data_lib.eos_id(tokenizer_dir)
    score, nll_sums = (run.scorer(m) for m in (metrics_lib.sequence_logprobs, metrics_lib.lm_metrics))
    if method in ("greedy", "beam") and not models.family(run.model).generates:
        raise ConfigError(
            f"--method={method} needs a model that generates (Llama family); this run's is {type(run.model).__name__}"
        )

    forward = runs.lm_forward(run.model, run.adapter_cfg)
    results = {}
    for task, records in records_by_task.items():
        if method == "perplexity":
            sums = scoring.perplexity_sums(records, tokenizer, nll_sums, config, eos, batch_size)
            results[task] = {**sums, "perplexity": math.exp(sums["nll"] / max(sums["tokens"], 1.0))}
            results[task]["records"] = len(records)
            continue
        if method != "loglik":
            beams = 4 if method == "beam" else 1
            params = (run.frozen, run.trainable)
            predictions, _ = scoring.generate_answers(
                records, task, tokenizer, forward, params, run.model.config, batch_size, 32, beams, eos
            )
        else:
            predictions = scoring.score_records(records, task, tokenizer, score, config.data.cutoff_len, batch_size)
        correct = sum(p == r["answer"] for p, r in zip(predictions, records, strict=True))
        results[task] = {"accuracy": correct / len(records), "correct": correct, "records": len(records)}
    tasks = list(records_by_task)
    if method == "perplexity":
        nll, tokens = sum(results[t]["nll"] for t in tasks), sum(results[t]["tokens"] for t in tasks)
        results["all"] = {"perplexity": math.exp(nll / max(tokens, 1.0)), "nll": nll, "tokens": tokens}
    else:
        results["average"] = {"accuracy": float(np.mean([results[t]["accuracy"] for t in tasks]))}
    _write_tables(workdir / "eval", run.step, method, tasks, results)
    return results


def evaluate_classifier(
    workdir: str | pathlib.Path,
    path: str = "",
    tfds_name: str = "",
    tfds_split: str = "validation",
    tfds_data_dir: str = "",
    batch_size: int = 16,
    limit: int = 0,
    adapter_dir: str | pathlib.Path | None = None,
    base_dir: str | pathlib.Path | None = None,
    cutoff_len: int = 128,
) -> dict[str, float]:
    """Accuracy, macro F1 (and F1 of label 1) of a classifier run on a labelled file or TFDS split.

    Writes ``eval/classification.json`` and ``.md``; batches are sharded over the run's mesh.
    With ``adapter_dir`` and ``base_dir`` it scores a PEFT SEQ_CLS adapter (adapters and head)
    over an encoder instead of a run; ``cutoff_len`` then bounds the tokens per record.
    """
    from dora_jax.data import classification

    workdir = pathlib.Path(workdir)
    if bool(path) == bool(tfds_name):
        raise ConfigError("give exactly one of --data_path (a JSON/JSONL file) or --tfds (a dataset name)")
    records = (
        classification.load_tfds(tfds_name, tfds_split, tfds_data_dir, limit)
        if tfds_name
        else classification.load_file(path)[: limit or None]
    )
    origin = f"TFDS {tfds_name} split {tfds_split}" if tfds_name else path
    if adapter_dir and io.read_peft_head(adapter_dir) is None:
        raise ConfigError(
            f"{adapter_dir}: no classifier head (modules_to_save) in this adapter; score a causal-LM "
            "adapter with --data_dir or --tfds instead of --data_path"
        )
    run = load(workdir, adapter_dir, base_dir, cutoff_len)
    if models.family(run.model).head is None:
        raise ConfigError(f"{workdir} trains {type(run.model).__name__}, not a sequence classifier")
    parallel.check_batch(batch_size, run.mesh, "--batch_size")
    tokenizer = io.load_tokenizer(data_lib.tokenizer_dir(run.config))
    max_len, pad_id = run.config.data.cutoff_len, classification.pad_id(tokenizer)
    classification.check_labels(records, run.model.config.num_labels, origin)
    rows = classification.labelled_rows(records, tokenizer, max_len)
    metric = run.scorer(metrics_lib.classification_metrics)
    totals = None
    for batch in classification.padded_batches(rows, batch_size, max_len, pad_id):
        sums = metric(batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    summary = {**metrics_lib.classification_summary(totals), "records": len(records)}
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stored = {"step": run.step, "data": origin, "results": summary}
    (out / "classification.json").write_text(json.dumps(stored, indent=2))
    lines = [f"Classification of {origin}, step {run.step}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    (out / "classification.md").write_text("\n".join(lines) + "\n")
    return summary


def _write_tables(out: pathlib.Path, step: int, method: str, tasks: list[str], results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "commonsense.json").write_text(json.dumps({"step": step, "method": method, "results": results}, indent=2))
    title = {
        "loglik": "Commonsense accuracy (log-likelihood multiple choice)",
        "greedy": "Commonsense accuracy (greedy generation, first answer word)",
        "beam": "Commonsense accuracy (beam search with 4 beams, first answer word)",
        "perplexity": "Perplexity of the gold responses",
    }[method]
    lines = [f"{title}, step {step}", ""]
    if method == "perplexity":
        lines += ["| task | perplexity | tokens | records |", "|---|---|---|---|"]
        lines += [
            f"| {t} | {results[t]['perplexity']:.4f} | {results[t]['tokens']:.0f} | {results[t]['records']} |"
            for t in tasks
        ]
        lines.append(f"| all | {results['all']['perplexity']:.4f} | {results['all']['tokens']:.0f} | |")
    else:
        lines += ["| task | accuracy | records |", "|---|---|---|"]
        lines += [f"| {t} | {results[t]['accuracy']:.4f} | {results[t]['records']} |" for t in tasks]
        lines.append(f"| average | {results['average']['accuracy']:.4f} | |")
    (out / "commonsense.md").write_text("\n".join(lines) + "\n")


def _classifier_run(workdir: pathlib.Path) -> bool:
    """Whether the run in ``workdir`` trains a sequence classifier (its config sets model.num_labels)."""
    path = workdir / "config.json"
    return path.exists() and json.loads(path.read_text()).get("model.num_labels", 0) > 0


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    workdir = flags.DEFINE_string(
        "workdir", None, "The --workdir of a dora_jax.train run (with --adapter: where tables go).", required=True
    )
    data_dir = flags.DEFINE_string("data_dir", None, "Directory with <task>/test.json files.")
    tfds_names = flags.DEFINE_list("tfds", [], f"TFDS datasets instead of files: {sorted(tfds_source.COMMONSENSE)}.")
    tfds_split = flags.DEFINE_string("tfds_split", "validation", "The TFDS split scored.")
    tfds_data_dir = flags.DEFINE_string("tfds_data_dir", "", "Where the TFDS datasets were prepared.")
    data_path = flags.DEFINE_string("data_path", "", "Classifier runs: a labelled JSON/JSONL file to score.")
    adapter = flags.DEFINE_string("adapter", "", "Score a PEFT adapter directory instead of a run (needs --base).")
    base = flags.DEFINE_string("base", "", "With --adapter: the HF directory of the base model.")
    cutoff_len = flags.DEFINE_integer("cutoff_len", 256, "With --adapter: tokens per scored sequence.")
    tasks = flags.DEFINE_list("tasks", [], "Tasks to score (default: every task data_dir holds).")
    limit = flags.DEFINE_integer("limit", 0, "Score only the first N records of each task (0: all).")
    batch_size = flags.DEFINE_integer("batch_size", 16, "Scored sequences (loglik) or prompts (greedy) per batch.")
    method = flags.DEFINE_enum(
        "method",
        "loglik",
        list(METHODS),
        "loglik: rank the answers; beam (official) or greedy: generate; perplexity: of the gold responses.",
    )

    def run(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            classifier_adapter = bool(adapter.value) and io.read_peft_head(adapter.value) is not None
            if classifier_adapter or (not adapter.value and _classifier_run(pathlib.Path(workdir.value))):
                evaluate_classifier(
                    workdir.value,
                    data_path.value,
                    ",".join(tfds_names.value),
                    tfds_split.value,
                    tfds_data_dir.value,
                    batch_size.value,
                    limit.value,
                    adapter.value or None,
                    base.value or None,
                    cutoff_len.value,
                )
                print((pathlib.Path(workdir.value) / "eval" / "classification.md").read_text())
                return
            evaluate_run(
                workdir.value,
                data_dir.value,
                tasks.value,
                limit.value,
                batch_size.value,
                method.value,
                tfds_names.value,
                tfds_split.value,
                tfds_data_dir.value,
                adapter.value or None,
                base.value or None,
                cutoff_len.value,
            )
        except DoraError as err:
            sys.exit(f"dora_jax.evaluate: {err}")
        print((pathlib.Path(workdir.value) / "eval" / "commonsense.md").read_text())

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
