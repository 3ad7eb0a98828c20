"""The training CLI: ``python -m dora_jax.train --config=configs/default.py --workdir=DIR``.

``train_and_evaluate(config, workdir)`` holds the loop: it places the run's model and what it
trains on a (data, fsdp, tensor) mesh (``runs.place``), builds the optimizer and one jitted pure
train step (``optim.make_train_step``), evaluates, logs (stdout, ``metrics.jsonl``, TensorBoard),
checkpoints with Orbax and resumes from the latest checkpoint, and exports the adapter (PEFT
format) and, on request, the merged model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dora_jax import base_model, metrics_writer, models, optim, parallel, run_config, runs, workdir_lock
from dora_jax import data as data_lib
from dora_jax import metrics as metrics_lib
from dora_jax.core import quantize
from dora_jax.errors import ConfigError, DivergenceError, DoraError
from dora_jax.io import checkpoints as io_checkpoints
from dora_jax.io.checkpoints import Checkpoints
from dora_jax.metrics_writer import MetricsWriter


def _check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that holds a run of another config; records the config of a new run."""
    current = json.loads(json.dumps(run_config.flat(config)))
    path = workdir / "config.json"
    if path.exists():
        stored = run_config.upgrade(json.loads(path.read_text()))
        changed = run_config.differences(stored, current)
        if changed:
            details = "; ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed[:10])
            raise ConfigError(
                f"{workdir} holds a run of another config ({len(changed)} keys differ: {details}); "
                "use a new --workdir or the same config"
            )
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2, sort_keys=True))


def _global_batch(rows: dict[str, np.ndarray], sharding: Any, global_rows: int) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:]) for k, v in rows.items()
    }


def count_params(tree: Any) -> int:
    """Parameters in ``tree``; a quantized kernel counts as its weights (not its codes and scales), and not at
    all where it holds no arrays (the trainable tree's shell of a frozen quantized kernel)."""
    leaves = jax.tree.leaves(tree, is_leaf=quantize.is_quantized)
    return int(sum(np.prod(x.shape) for x in leaves if not quantize.is_quantized(x) or jax.tree.leaves(x)))


@dataclasses.dataclass
class Training:
    """A placed run (``runs.LoadedRun``) with what training adds: data, jitted steps, first state."""

    run: runs.LoadedRun
    source: Any
    state: Any  # {"step", "trainable", "opt_state"}
    state_sharding: Any
    train_step: Any
    eval_step: Any

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.run.config

    @property
    def frozen(self) -> Any:
        return self.run.frozen

    def batch(self, index: int) -> dict[str, jax.Array]:
        """Global training batch ``index``, assembled from this host's rows."""
        size = self.config.train.batch_size
        rows = self.source.batch(index, size, jax.process_index(), jax.process_count())
        return _global_batch(rows, self.run.batch_sharding, size)

    def step_rng(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def evaluate(self, trainable: Any) -> dict[str, float]:
        totals = None
        for rows in self.source.eval_batches():
            batch = _global_batch(rows, self.run.batch_sharding, self.config.data.eval_batch_size)
            sums = self.eval_step(trainable, self.run.frozen, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return metrics_lib.summarise(totals)


def build(config: ml_collections.ConfigDict) -> Training:
    """Checks ``config`` and builds its mesh, data, placed model, optimizer, jitted steps and state."""
    run_config.check(config)
    mesh = runs.make_mesh(config)
    parallel.check_batch(config.train.batch_size, mesh)
    parallel.check_batch(config.data.eval_batch_size, mesh, "data.eval_batch_size")
    source = data_lib.make_source(config)
    if config.train.epochs > 0:
        if not hasattr(source, "epoch_steps"):
            raise ConfigError(f"train.epochs needs a finite dataset; data.source={config.data.source!r} is endless")
        config = copy.deepcopy(config)
        config.train.steps = config.train.epochs * source.epoch_steps(config.train.batch_size)
    classify = data_lib.is_classification(source)
    module = base_model.base_module(config)  # the model/task fit is checked before any weight is read
    if classify != (models.family(module).head is not None):
        raise ConfigError(
            f"data.source={config.data.source!r} does not fit {type(module).__name__}: sequence classification "
            "needs model.num_labels > 0 (a BERT-family encoder) with data.source='classification'"
        )
    if not classify and models.family(module).output != "logits":
        raise ConfigError(
            f"data.source={config.data.source!r} trains a causal LM (next-token targets), but the model is "
            f"{type(module).__name__}, an encoder without an LM head: use a Llama-family model, or "
            "data.source='classification' with model.num_labels > 0"
        )
    first = source.batch(0, config.train.batch_size)
    if not np.any(first["loss_mask"]):
        raise ConfigError(
            f"the first training batch of data.source={config.data.source!r} has no token to learn from (an "
            f"all-zero loss mask): responses cut by data.cutoff_len={config.data.cutoff_len}, or a prompt template "
            "that leaves no response"
        )
    if source.vocab_size > module.config.vocab_size:
        raise ConfigError(f"data needs a vocabulary of {source.vocab_size}; the model has {module.config.vocab_size}")
    run = runs.place(config, mesh)
    tx = optim.make_optimizer(config.train, run.trainable)
    metrics = metrics_lib.classification_metrics if classify else metrics_lib.lm_metrics
    train_step, state_sharding = jit_train_step(run, tx, metrics)
    state = jax.jit(functools.partial(optim.init_state, tx), out_shardings=state_sharding)(run.trainable)
    return Training(run, source, state, state_sharding, train_step, run.jit_metric(metrics))


def jit_train_step(run: runs.LoadedRun, tx: optax.GradientTransformation, metrics: Any) -> tuple[Any, Any]:
    """The run's jitted train step ``(state, frozen, batch, rng) -> (state, sums)`` and the sharding of
    its state; ``run``'s trees may be abstract (``jax.ShapeDtypeStruct``: what scripts/memory_plan.py compiles)."""
    replicated = parallel.replicated(run.mesh)
    opt_sharding = optax.tree_map_params(  # the moments of a leaf shard like the leaf; a group's others stay masked
        tx,
        lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s,
        jax.eval_shape(tx.init, run.trainable),
        run.trainable_sharding,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda node: isinstance(node, optax.MaskedNode),
    )
    state_sharding = {"step": replicated, "trainable": run.trainable_sharding, "opt_state": opt_sharding}
    forward = runs.make_forward(run.model, run.adapter_cfg)
    train_step = jax.jit(
        parallel.under_mesh(
            optim.make_train_step(forward, tx, metrics, grad_accum=run.config.train.grad_accum), run.mesh
        ),
        in_shardings=(state_sharding, run.frozen_sharding, run.batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    return train_step, state_sharding


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains (or resumes) the run of ``config`` in ``workdir`` and returns its summary; one run per
    workdir at a time (``workdir_lock``)."""
    workdir = pathlib.Path(workdir)
    training = build(config)
    with workdir_lock.held(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(training, workdir)


def _train_and_evaluate(training: Training, workdir: pathlib.Path) -> dict[str, Any]:
    run, config = training.run, training.config  # with train.steps resolved from train.epochs
    _check_workdir(workdir, config)
    finished = _finished_summary(workdir, config)
    if finished is not None:
        print(
            f"{workdir} holds this run, finished (step {finished['step']} of {config.train.steps}); nothing to do "
            "(dora_jax.export and dora_jax.evaluate write its exports and scores again)",
            flush=True,
        )
        return finished
    checkpoints = Checkpoints(
        workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save, config.checkpoint.keep_period
    )
    state = training.state

    def current_layout(step: int) -> None:
        if not runs.is_current_layout(io_checkpoints.stored_trainable(workdir / "checkpoints", step)):
            raise ConfigError(
                f"{workdir / 'checkpoints'}: step {step} was written by an earlier dora_jax (its trained state is "
                "not {'adapters', 'params'}); it scores and exports (dora_jax.evaluate, dora_jax.export) but cannot "
                "resume: train in a new --workdir"
            )

    restored = checkpoints.restore_newest_intact(runs.abstract(state, training.state_sharding), current_layout)
    latest = None if restored is None else restored[0]
    if restored is None:
        meta = {"before": training.evaluate(state["trainable"]), "seed": config.seed}
    else:
        latest, state, meta = restored
        print(f"resumed from {workdir / 'checkpoints'} at step {latest}", flush=True)
    start = int(state["step"])
    stop = min(config.train.steps, config.train.stop_at or config.train.steps)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, resumed_at=latest)
    if latest is None:
        writer.write(0, {f"eval/{k}": v for k, v in meta["before"].items()})
    labels = optim.group_labels(state["trainable"])  # VeRA's shared projections ride along, frozen: not counted
    trainable_count = count_params(jax.tree.map(lambda x, g: None if g == "frozen" else x, state["trainable"], labels))
    total_count = count_params(run.frozen) + trainable_count
    tokens_per_step = config.train.batch_size * training.source.seq_len
    bar = writer.progress(total=config.train.steps, initial=start, enabled=config.train.progress_bar)
    speeds, window, window_steps, window_start = [], None, 0, time.perf_counter()
    last_good = start  # the newest step known to have finite loss and gradient norm
    try:
        for step in range(start, stop):
            state, metrics = training.train_step(state, run.frozen, training.batch(step), training.step_rng(step))
            window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
            window_steps += 1
            done = step + 1
            checks = (config.train.log_every, config.train.eval_every, config.checkpoint.every)
            if any(done % every == 0 for every in checks) or done == stop:
                _check_finite(window, last_good, done, workdir)  # before anything logs, evaluates or saves it
                last_good = done
            if done % config.train.log_every == 0 or done == stop:
                scalars = {"train/" + k: v for k, v in metrics_lib.summarise(window).items()}
                scalars["train/grad_norm"] = float(window["grad_norm"]) / window_steps
                scalars["train/tokens_per_s"] = tokens_per_step * window_steps / (time.perf_counter() - window_start)
                speeds.append(scalars["train/tokens_per_s"])
                writer.write(done, scalars)
                bar.update_to(done, loss=scalars["train/loss"], tokens_per_s=scalars["train/tokens_per_s"])
                window, window_steps, window_start = None, 0, time.perf_counter()
            if done % config.train.eval_every == 0 and done != config.train.steps:
                writer.write(done, {f"eval/{k}": v for k, v in training.evaluate(state["trainable"]).items()})
            if done % config.checkpoint.every == 0 or done == stop:
                checkpoints.save(done, state, {**meta, "data_index": done})
    finally:  # a stop (divergence, an interrupt) still lets a pending save finish
        bar.close()
        checkpoints.close()
    final_step = int(state["step"])
    summary = {
        "method": run_config.method_name(config),
        "step": final_step,
        "steps": config.train.steps,
        "trainable_params": trainable_count,
        "total_params": total_count,
        "trainable_share": trainable_count / total_count,
        "before": meta["before"],
    }
    if final_step < config.train.steps:
        print(f"stopped at step {final_step} of {config.train.steps}; run again to resume", flush=True)
        writer.close()
        return summary
    summary["after"] = training.evaluate(state["trainable"])
    summary["tokens_per_s"] = float(np.median(speeds)) if speeds else None
    writer.write(final_step, {f"eval/{k}": v for k, v in summary["after"].items()})
    writer.close()
    if jax.process_index() == 0:
        _export(dataclasses.replace(run, trainable=state["trainable"], step=final_step), workdir)
        (workdir / "summary.json").write_text(metrics_writer.dumps(summary, indent=2))
        print(_report(summary, workdir), flush=True)
    return summary


def _finished_summary(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The summary of the run in ``workdir`` when it already finished all ``train.steps``."""
    path = workdir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if "after" in summary and summary["step"] >= config.train.steps else None


def _check_finite(window: dict[str, Any], last_good: int, step: int, workdir: pathlib.Path) -> None:
    """Raises DivergenceError when a step since ``last_good`` had a non-finite loss or gradient norm:
    the run stops before that state is logged, evaluated, checkpointed or exported."""
    if bool(jnp.isfinite(window["loss"]) & jnp.isfinite(window["grad_norm"])):
        return
    raise DivergenceError(
        f"training diverged: a non-finite loss or gradient norm between steps {last_good + 1} and {step}; "
        f"{workdir / 'checkpoints'} keeps the newest checkpoint up to step {last_good}, nothing later is saved "
        "or exported (lower train.learning_rate, raise train.warmup_steps or set train.clip_norm)"
    )


def _export(run: runs.LoadedRun, workdir: pathlib.Path) -> None:
    """What a finished run writes: the fine-tuned model (full fine-tuning), or the adapter and, on
    request, the merged model."""
    if run.adapter_cfg is None:
        run.export("merged", workdir / "model")
        return
    if run.config.export.peft:
        run.export("peft", workdir / "adapter")
    if run.config.export.merged:
        run.export("merged", workdir / "merged")


def _report(summary: dict[str, Any], workdir: pathlib.Path) -> str:
    before, after = summary["before"], summary["after"]
    names = {
        "exact_match": "exact match",
        "token_accuracy": "token acc.",
        "accuracy": "accuracy",
        "macro_f1": "macro F1",
        "f1": "F1",
        "loss": "loss",
    }
    lines = [
        f"{summary['method']}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} parameters "
        f"({100 * summary['trainable_share']:.2f}%)"
    ]
    lines += [f"  eval {label:<12} {before[k]:.4f} -> {after[k]:.4f}" for k, label in names.items() if k in after]
    lines.append(f"  written to {workdir}")
    return "\n".join(lines)


# --- the command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Directory for everything the run writes.", required=True)

    def parse(args):
        return run_config.parse_flags(flags.FLAGS, args, "dora_jax.train")

    def run(_):
        logging.basicConfig(level=logging.WARNING)
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
        config = run_config.loaded(config_flag.value, "dora_jax.train")
        try:
            train_and_evaluate(config, workdir_flag.value)
        except DoraError as err:
            sys.exit(f"dora_jax.train: {err}")

    app.run(run, argv=argv, flags_parser=parse)


if __name__ == "__main__":
    main()
