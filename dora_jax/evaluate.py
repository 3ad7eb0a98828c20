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

import functools
import json
import math
import pathlib
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax import data as data_lib
from dora_jax import generate, io, models, parallel, run_config, train
from dora_jax.data import commonsense, sampling, tfds_source
from dora_jax.data.instruction import NO_LOSS_ROW, encode_all, pack_rows
from dora_jax.errors import ConfigError, DoraError

RESPONSE = "the correct answer is {}"
METHODS = ("loglik", "greedy", "beam", "perplexity")


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
    for chunk in sampling.chunks(rows, batch_size, NO_LOSS_ROW):
        scores.extend(np.asarray(score_fn(pack_rows(chunk, cutoff_len - 1))).tolist())
    scores = scores[: len(rows)]  # without the filler rows of the last batch
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
    params: Any,
    config: Any,
    batch_size: int,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    eos_id: int | None = None,
) -> tuple[list[str], list[str]]:
    """(answers, generated texts): decoding after the evaluation prompt, then ``extract_answer``.

    ``forward(params, ids, **kw)`` as ``generate`` takes it (``lm_forward``); every batch reuses
    one compiled decoding loop.

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
            new = generate.greedy(forward, params, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens)
        else:
            new, _ = generate.beam_search(
                forward, params, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens, num_beams, eos_id
            )
        texts += [tokenizer.decode(np.asarray(row).tolist(), skip_special_tokens=True) for row in new[: len(chunk)]]
    return [commonsense.extract_answer(task, commonsense.response(t)) for t in texts], texts


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


def perplexity_sums(
    records: list[dict[str, str]], tokenizer: Any, eval_fn: Any, config: Any, eos_id: int | None, batch_size: int
) -> dict[str, float]:
    """Summed NLL and token count of the records' training texts, on the tokens the run trains on."""
    encoded = encode_all(records, tokenizer, config.data.cutoff_len, eos_id, config.data.train_on_inputs)
    nll = tokens = 0.0
    for chunk in sampling.chunks(encoded, batch_size, NO_LOSS_ROW):
        sums = eval_fn(pack_rows(chunk, config.data.cutoff_len - 1))
        nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
    return {"nll": nll, "tokens": tokens}


def sharded_metric(run: Any, trainable: Any, metric: Any) -> Any:
    """batch -> metric(logits, batch) of the run's model, jitted, batches split over the mesh like training."""
    forward = train.make_forward(run.model, run.adapter_cfg)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, run.frozen)  # passed, not closed over: no constants
    jitted = jax.jit(
        lambda trainable, frozen, batch: metric(forward(trainable, frozen, batch, None), batch),
        in_shardings=(run.state_sharding["trainable"], frozen_sharding, run.batch_sharding),
    )
    return functools.partial(jitted, trainable, run.frozen)


def _require_base(base_dir: Any) -> pathlib.Path:
    """--base as a path; scoring an adapter needs the model it was trained on."""
    if not base_dir:
        raise ConfigError("--adapter needs --base: the HF directory of the model the adapter was trained on")
    return pathlib.Path(base_dir)


def _adapter_run(base_dir: Any, adapter_dir: Any, hf_config: dict[str, Any], head: Any, **data: Any) -> Any:
    """(run, trainable) for a PEFT adapter over the HF base whose config (as a classifier when
    ``head`` is given) is ``hf_config``; the run is built as ``dora_jax.train`` builds one."""
    model = models.from_hf_config(hf_config)
    adapters, cfg = io.import_peft(adapter_dir, models.abstract_params(model), model=model)
    config = run_config.defaults()
    config.model.update(hf_dir=str(base_dir), num_labels=0 if head is None else int(head["bias"].shape[0]))
    config.adapter.update(cfg.to_dict())
    config.data.update(data)
    run = train.build(config)
    trainable = adapters if head is None else {"adapters": adapters, "head": head}
    return run, jax.device_put(trainable, run.state_sharding["trainable"])


def adapter_run(base_dir: str | pathlib.Path, adapter_dir: str | pathlib.Path, cutoff_len: int = 256) -> Any:
    """(run, adapters) for a PEFT adapter directory over a local HF base model, ready to score.

    The adapter (ours or PEFT's) is imported with ``io.import_peft``; the run is built as
    ``dora_jax.train`` builds one (mesh, shardings) from a config with that adapter's settings.
    """
    hf_config = io.read_config(_require_base(base_dir))
    return _adapter_run(base_dir, adapter_dir, hf_config, None, cutoff_len=cutoff_len)


def classifier_adapter_run(
    base_dir: str | pathlib.Path, adapter_dir: str | pathlib.Path, records: list[dict[str, Any]], cutoff_len: int
) -> Any:
    """(run, trainable) for a PEFT SEQ_CLS adapter directory over a local HF encoder, ready to score.

    The run is built as ``dora_jax.train`` builds a classifier run, with ``records`` as its
    (unused) data so that it carries the tokenizer and the label count.
    """
    base_dir = _require_base(base_dir)
    head = io.read_peft_head(adapter_dir)
    if head is None:
        raise ConfigError(
            f"{adapter_dir}: no classifier head (modules_to_save) in this adapter; score a causal-LM "
            "adapter with --data_dir or --tfds instead of --data_path"
        )
    hf_config = io.classifier_config(io.read_config(base_dir), int(head["bias"].shape[0]))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "records.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records))
        data = dict(source="classification", path=str(path), cutoff_len=cutoff_len, val_size=0)
        return _adapter_run(base_dir, adapter_dir, hf_config, head, **data)


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
    if adapter_dir:
        (run, trainable), step = adapter_run(base_dir, adapter_dir, cutoff_len), 0
    else:
        run, trainable, step = train.restore_latest(workdir)
    config = run.config
    parallel.check_batch(batch_size, run.mesh, "--batch_size")
    tokenizer_dir = config.data.tokenizer_dir or run_config.require_path("model.hf_dir", config.model.hf_dir)
    tokenizer = io.load_tokenizer(tokenizer_dir)
    eos = data_lib.eos_id(pathlib.Path(tokenizer_dir))
    score, nll_sums = (sharded_metric(run, trainable, m) for m in (sequence_logprobs, train.lm_metrics))
    if method in ("greedy", "beam") and not models.family(run.model).generates:
        raise ConfigError(
            f"--method={method} needs a model that generates (Llama family); this run's is {type(run.model).__name__}"
        )

    forward = lm_forward(run.model, run.adapter_cfg)
    results = {}
    for task, records in records_by_task.items():
        if method == "perplexity":
            sums = perplexity_sums(records, tokenizer, nll_sums, config, eos, batch_size)
            results[task] = {**sums, "perplexity": math.exp(sums["nll"] / max(sums["tokens"], 1.0))}
            results[task]["records"] = len(records)
            continue
        if method != "loglik":
            beams = 4 if method == "beam" else 1
            predictions, _ = generate_answers(
                records, task, tokenizer, forward, (run.frozen, trainable), run.model.config, batch_size, 32, beams, eos
            )
        else:
            predictions = score_records(records, task, tokenizer, score, config.data.cutoff_len, batch_size)
        correct = sum(p == r["answer"] for p, r in zip(predictions, records, strict=True))
        results[task] = {"accuracy": correct / len(records), "correct": correct, "records": len(records)}
    tasks = list(records_by_task)
    if method == "perplexity":
        nll, tokens = sum(results[t]["nll"] for t in tasks), sum(results[t]["tokens"] for t in tasks)
        results["all"] = {"perplexity": math.exp(nll / max(tokens, 1.0)), "nll": nll, "tokens": tokens}
    else:
        results["average"] = {"accuracy": float(np.mean([results[t]["accuracy"] for t in tasks]))}
    _write_tables(workdir / "eval", step, method, tasks, results)
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
    if adapter_dir:
        (run, trainable), step = classifier_adapter_run(base_dir, adapter_dir, records, cutoff_len), 0
    else:
        run, trainable, step = train.restore_latest(workdir)
    if not train.is_classifier(run.model):
        raise ConfigError(f"{workdir} trains {type(run.model).__name__}, not a sequence classifier")
    parallel.check_batch(batch_size, run.mesh, "--batch_size")
    source = run.source
    classification.check_labels(records, source.num_labels, origin)
    rows = classification.labelled_rows(records, source.tokenizer, source.max_len)
    metric = sharded_metric(run, trainable, train.classification_metrics)
    totals = None
    for batch in classification.padded_batches(rows, batch_size, source.max_len, source.pad_id):
        sums = metric(batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    summary = {**train.classification_summary(totals), "records": len(records)}
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "classification.json").write_text(json.dumps({"step": step, "data": origin, "results": summary}, indent=2))
    lines = [f"Classification of {origin}, step {step}", "", "| metric | value |", "|---|---|"]
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


def lm_forward(model: Any, adapter_cfg: Any) -> Any:
    """forward((frozen, trainable), ids, **kw): a run's model (``train.make_apply``) for ``generate``."""
    apply = train.make_apply(model, adapter_cfg)
    return lambda params, ids, **kwargs: apply(params[1], params[0], ids, **kwargs)


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
