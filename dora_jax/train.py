"""The training CLI: ``python -m dora_jax.train --config=configs/default.py --workdir=DIR``.

``train_and_evaluate(config, workdir)`` holds the loop: it loads the base model (an HF directory,
or the synthetic base it builds on first use), shards params, adapters and optimizer state over a
(data, fsdp, tensor) mesh, runs one jitted pure ``train_step`` per optimizer step, evaluates,
logs (stdout, ``metrics.jsonl``, TensorBoard), checkpoints with Orbax and resumes from the latest
checkpoint, and exports the adapter (PEFT format) and, on request, the merged model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dora_jax import data as data_lib
from dora_jax import io, models, parallel, run_config
from dora_jax.core import init_adapters, merge
from dora_jax.errors import ConfigError, DoraError, InjectError
from dora_jax.inject import describe, inject, merged_targets
from dora_jax.io.checkpoints import Checkpoints
from dora_jax.metrics_writer import MetricsWriter

log = logging.getLogger("dora_jax.train")


# --- the base model -----------------------------------------------------------------------------


def synthetic_base_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Where the synthetic base of ``config`` is cached: one folder per distinct recipe."""
    recipe = {
        "base": {k: v for k, v in run_config.flat(config.model.base).items() if k != "cache_dir"},
        "data": [config.data.length, config.data.num_symbols],
        "seed": config.seed,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = (
        config.model.base.cache_dir or os.environ.get("DORA_JAX_CACHE") or pathlib.Path.home() / ".cache" / "dora_jax"
    )
    return pathlib.Path(root) / f"synthetic-base-{digest}"


def build_synthetic_base(config: ml_collections.ConfigDict) -> pathlib.Path:
    """Pretrains the small base model on ``model.base.task`` once and caches it as an HF directory."""
    target = synthetic_base_dir(config)
    if (target / "config.json").exists():
        return target
    base = config.model.base
    pretrain = run_config.defaults()
    pretrain.seed = config.seed
    pretrain.model.hf_dir = "random"
    pretrain.model.base = config.model.base
    pretrain.adapter.method = "full"
    pretrain.data = config.data
    pretrain.data.task = base.task
    pretrain.train.update(steps=base.steps, batch_size=base.batch_size, learning_rate=base.learning_rate)
    pretrain.train.warmup_steps = min(50, base.steps // 4)
    pretrain.train.eval_every = max(base.steps, 1)
    pretrain.train.progress_bar = config.train.progress_bar
    pretrain.checkpoint.every = max(base.steps, 1)
    pretrain.mesh = config.mesh
    print(f"building the synthetic base model: {base.steps} steps of {base.task!r} -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
        train_and_evaluate(pretrain, tmp)
        os.replace(pathlib.Path(tmp) / "model", target)
    return target


def load_base(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(model, params) of the run's base model, params in ``model.dtype``."""
    dtype, compute = jnp.dtype(config.model.dtype), jnp.dtype(config.model.compute_dtype)
    if config.model.hf_dir == "random":
        model = models.from_hf_config(
            config.model.base.architecture.to_dict(), dtype=compute, param_dtype=dtype, remat=config.model.remat
        )
        return model, models.init_params(model, jax.random.key(config.seed))
    hf_dir = run_config.require_path("model.hf_dir", config.model.hf_dir) if config.model.hf_dir else None
    hf_dir = hf_dir or build_synthetic_base(config)
    return io.load_hf(
        hf_dir, dtype=dtype, compute_dtype=compute, num_labels=config.model.num_labels, remat=config.model.remat
    )


# --- the pure steps -----------------------------------------------------------------------------


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position, in float32: (batch, seq)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def lm_metrics(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The sums behind masked next-token loss, token accuracy and exact match of a batch."""
    mask = batch["loss_mask"]
    correct = (logits.argmax(-1) == batch["targets"]) * mask
    scored = mask.sum(-1) > 0
    return {
        "nll": -(token_logprobs(logits, batch["targets"]) * mask).sum(),
        "correct": correct.sum(),
        "tokens": mask.sum(),
        "exact": (jnp.all(correct == mask, axis=-1) & scored).sum(),
        "sequences": scored.sum(),
    }


def classification_metrics(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The sums behind cross-entropy, accuracy and per-class F1 of a batch (rows with loss_mask 0 excluded)."""
    mask = batch["loss_mask"]
    labels, predicted = batch["labels"], logits.argmax(-1)
    classes = jnp.arange(logits.shape[-1])
    is_label = (labels[:, None] == classes) * mask[:, None]
    is_predicted = (predicted[:, None] == classes) * mask[:, None]
    return {
        "nll": -(token_logprobs(logits, labels) * mask).sum(),
        "correct": ((predicted == labels) * mask).sum(),
        "examples": mask.sum(),
        "true_pos": (is_label * is_predicted).sum(0),
        "false_pos": ((1 - is_label) * is_predicted).sum(0),
        "false_neg": (is_label * (1 - is_predicted)).sum(0),
    }


def is_classifier(model: Any) -> bool:
    """Whether the model has a head trained in full with the adapters (a sequence classifier)."""
    return models.family(model).head is not None


def split_trainable(trainable: Any) -> tuple[Any, Any]:
    """(adapters, head params or None) of an adapter run's trainable tree."""
    if isinstance(trainable, dict) and set(trainable) == {"adapters", "head"}:
        return trainable["adapters"], trainable["head"]
    return trainable, None


def with_head(model: Any, params: Any, head: Any) -> Any:
    """``params`` with the model's head replaced by the trained ``head`` (no-op for None)."""
    return params if head is None else {**params, models.family(model).head: head}


def make_apply(model: Any, adapter_cfg: Any):
    """apply(trainable, frozen, ids, **kw) -> the model's output, for full fine-tuning (trainable is
    the params) or adapters (and a trained head) over the frozen params; ``kw`` go to ``apply``."""
    adapted = None if adapter_cfg is None else inject(model.apply, adapter_cfg)

    def apply(trainable, frozen, ids, **kwargs):
        if adapted is None:
            return model.apply({"params": trainable}, ids, **kwargs)
        adapters, head = split_trainable(trainable)
        return adapted(with_head(model, frozen, head), adapters, ids, **kwargs)

    return apply


def make_forward(model: Any, adapter_cfg: Any):
    """forward(trainable, frozen, batch, rng) -> logits: ``make_apply`` on a batch, dropout from ``rng``."""
    names = models.family(model).inputs
    apply = make_apply(model, adapter_cfg)

    def forward(trainable, frozen, batch, rng):
        kwargs = {k: batch[k] for k in names}
        if adapter_cfg is not None:
            kwargs["dropout_rng"] = rng
        return apply(trainable, frozen, batch["inputs"], **kwargs)

    return forward


def make_train_step(forward, tx: optax.GradientTransformation, grad_accum: int, metrics: Any = lm_metrics):
    """train_step(state, frozen, batch, rng) -> (state, metrics); only state["trainable"] is differentiated.

    ``metrics(logits, batch)`` returns sums with "nll"; the loss is nll / batch["loss_mask"].sum().
    """

    def loss_fn(trainable, frozen, batch, rng, tokens):
        sums = metrics(forward(trainable, frozen, batch, rng), batch)
        return sums["nll"] / tokens, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, frozen, batch, rng):
        # Every micro-batch divides by the whole batch's token count, so the summed gradients are
        # exactly the full batch's, whatever the tokens per micro-batch.
        tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        if grad_accum == 1:
            (loss, sums), grads = grad_fn(state["trainable"], frozen, batch, rng, tokens)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                index, micro_batch = xs
                out = grad_fn(state["trainable"], frozen, micro_batch, jax.random.fold_in(rng, index), tokens)
                return jax.tree.map(jnp.add, carry, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state["trainable"], frozen, first, rng, tokens)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, sums), grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **sums}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(forward, metrics: Any = lm_metrics):
    def eval_step(trainable, frozen, batch):
        return metrics(forward(trainable, frozen, batch, None), batch)

    return eval_step


def make_optimizer(config: ml_collections.ConfigDict, trainable: Any) -> optax.GradientTransformation:
    """AdamW with warmup and a cosine/linear/constant schedule, clipping and a weight-decay mask
    (``config`` as ``run_config.check`` accepts it)."""
    t = config.train
    decay_steps = max(t.steps - t.warmup_steps, 1)
    end = t.learning_rate * t.end_learning_rate_ratio
    after = {
        "cosine": optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.end_learning_rate_ratio),
        "linear": optax.linear_schedule(t.learning_rate, end, decay_steps),
        "constant": optax.constant_schedule(t.learning_rate),
    }
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps), after[t.schedule]], [t.warmup_steps]
    )
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda kp, leaf: leaf.ndim >= 2 or (t.decay_magnitude and kp[-1].key == "m"), trainable
    )
    chain = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    return optax.chain(*chain, optax.adamw(schedule, weight_decay=t.weight_decay, mask=decay_mask))


# --- the loop -----------------------------------------------------------------------------------


def _check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that holds a run of another config; records the config of a new run."""
    current = json.loads(json.dumps(run_config.flat(config)))
    path = workdir / "config.json"
    if path.exists():
        stored = json.loads(path.read_text())
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


def _summarise(sums: dict[str, Any]) -> dict[str, float]:
    if "examples" in sums:
        return classification_summary(sums)
    sums = {k: float(v) for k, v in sums.items()}
    return {
        "loss": sums["nll"] / max(sums["tokens"], 1.0),
        "token_accuracy": sums["correct"] / max(sums["tokens"], 1.0),
        "exact_match": sums["exact"] / max(sums["sequences"], 1.0),
    }


def classification_summary(sums: dict[str, Any]) -> dict[str, float]:
    """Loss, accuracy, macro F1 and (two labels) the F1 of label 1, as GLUE reports for MRPC and QQP."""
    tp, fp, fn = (np.asarray(sums[k], np.float64) for k in ("true_pos", "false_pos", "false_neg"))
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1.0), 0.0)
    examples = max(float(sums["examples"]), 1.0)
    out = {"loss": float(sums["nll"]) / examples, "accuracy": float(sums["correct"]) / examples}
    out["macro_f1"] = float(f1.mean())
    if len(f1) == 2:
        out["f1"] = float(f1[1])
    return out


def count_params(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Run:
    """Everything a run's loop uses, built from its config: mesh, model, data, jitted steps, state."""

    config: ml_collections.ConfigDict
    mesh: Any
    model: Any
    source: Any
    adapter_cfg: Any
    params: Any
    frozen: Any
    state: Any
    state_sharding: Any
    batch_sharding: Any
    train_step: Any
    eval_step: Any

    def batch(self, index: int) -> dict[str, jax.Array]:
        """Global training batch ``index``, assembled from this host's rows."""
        size = self.config.train.batch_size
        rows = self.source.batch(index, size, jax.process_index(), jax.process_count())
        return _global_batch(rows, self.batch_sharding, size)

    def step_rng(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.config.seed), step)

    def evaluate(self, trainable: Any) -> dict[str, float]:
        totals = None
        for rows in self.source.eval_batches():
            batch = _global_batch(rows, self.batch_sharding, self.config.data.eval_batch_size)
            sums = self.eval_step(trainable, self.frozen, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return _summarise(totals)


def report_merged_targets(model: Any, params: Any, adapters: Any, adapter_cfg: Any) -> dict[str, str]:
    """Logs, once, every target the adapted forward cannot run and merges (builds W') instead, with
    the reason; with ``adapter.fallback=error`` that is an InjectError naming them."""
    merged = merged_targets(model.apply, adapter_cfg, params, adapters, *models.dummy_inputs(model))
    if merged and adapter_cfg.fallback == "error":
        raise InjectError(f"adapter.fallback=error and targets the adapted forward cannot run: {describe(merged)}")
    for path, why in merged.items():
        log.warning("target %s is merged into the kernel at every step (W' built): %s", path, why)
    return merged


def build(config: ml_collections.ConfigDict) -> Run:
    """Checks ``config`` and builds its mesh, model, shardings, jitted steps and initial state."""
    run_config.check(config)
    if config.distributed:
        jax.distributed.initialize()
    mesh = parallel.make_mesh({axis: config.mesh[axis] for axis in parallel.AXES})
    rules = parallel.rules_from(config.mesh.rules)
    parallel.check_batch(config.train.batch_size, mesh)
    parallel.check_batch(config.data.eval_batch_size, mesh, "data.eval_batch_size")
    source = data_lib.make_source(config)
    if config.train.epochs > 0:
        if not hasattr(source, "epoch_steps"):
            raise ConfigError(f"train.epochs needs a finite dataset; data.source={config.data.source!r} is endless")
        config = copy.deepcopy(config)
        config.train.steps = config.train.epochs * source.epoch_steps(config.train.batch_size)
    model, params = load_base(config)
    classify = data_lib.is_classification(source)
    if classify != is_classifier(model):
        raise ConfigError(
            f"data.source={config.data.source!r} does not fit {type(model).__name__}: sequence classification "
            "needs model.num_labels > 0 (a BERT-family encoder) with data.source='classification'"
        )
    if source.vocab_size > model.config.vocab_size:
        raise ConfigError(f"data needs a vocabulary of {source.vocab_size}; the model has {model.config.vocab_size}")
    logical = models.logical_axes(model)
    param_sharding = parallel.param_shardings(logical, params, mesh, rules)
    params = jax.device_put(params, param_sharding)
    adapter_cfg = run_config.adapter_config(config)
    if adapter_cfg is None:
        trainable, frozen, trainable_sharding, frozen_sharding = params, None, param_sharding, None
    else:
        adapters = init_adapters(jax.random.key(config.seed), params, adapter_cfg)
        report_merged_targets(model, params, adapters, adapter_cfg)
        trainable_sharding = parallel.adapter_shardings(adapters, logical, mesh, rules)
        trainable, frozen, frozen_sharding = jax.device_put(adapters, trainable_sharding), params, param_sharding
        if classify:  # the new head is trained in full, as PEFT's modules_to_save
            head_key = models.family(model).head
            trainable = {"adapters": trainable, "head": params[head_key]}
            trainable_sharding = {"adapters": trainable_sharding, "head": param_sharding[head_key]}

    tx = make_optimizer(config, trainable)
    replicated = parallel.replicated(mesh)
    opt_sharding = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, trainable),
        trainable_sharding,
        transform_non_params=lambda _: replicated,
    )
    state_sharding = {"step": replicated, "trainable": trainable_sharding, "opt_state": opt_sharding}
    batch_sharding = parallel.batch_sharding(mesh)
    forward = make_forward(model, adapter_cfg)
    metrics = classification_metrics if classify else lm_metrics
    train_step = jax.jit(
        make_train_step(forward, tx, config.train.grad_accum, metrics),
        in_shardings=(state_sharding, frozen_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(forward, metrics),
        in_shardings=(trainable_sharding, frozen_sharding, batch_sharding),
        out_shardings=replicated,
    )
    init_state = jax.jit(
        lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t, "opt_state": tx.init(t)},
        out_shardings=state_sharding,
    )
    return Run(
        config,
        mesh,
        model,
        source,
        adapter_cfg,
        params,
        frozen,
        init_state(trainable),
        state_sharding,
        batch_sharding,
        train_step,
        eval_step,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains (or resumes) the run of ``config`` in ``workdir`` and returns its summary."""
    workdir = pathlib.Path(workdir)
    run = build(config)
    config = run.config  # with train.steps resolved from train.epochs
    _check_workdir(workdir, config)
    checkpoints = Checkpoints(workdir / "checkpoints", config.checkpoint.keep, config.checkpoint.async_save)
    latest = checkpoints.latest_step()
    state = run.state
    if latest is None:
        meta = {"before": run.evaluate(state["trainable"]), "seed": config.seed}
    else:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, run.state_sharding
        )
        state, meta = checkpoints.restore(latest, abstract)
        print(f"resumed from {workdir / 'checkpoints'} at step {latest}", flush=True)
    start = int(state["step"])
    stop = min(config.train.steps, config.train.stop_at or config.train.steps)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    if latest is None:
        writer.write(0, {f"eval/{k}": v for k, v in meta["before"].items()})
    trainable_count = count_params(state["trainable"])
    total_count = count_params(run.params) + (trainable_count if run.adapter_cfg is not None else 0)
    tokens_per_step = config.train.batch_size * run.source.seq_len
    bar = writer.progress(total=config.train.steps, initial=start, enabled=config.train.progress_bar)
    speeds, window, window_steps, window_start = [], None, 0, time.perf_counter()
    for step in range(start, stop):
        state, metrics = run.train_step(state, run.frozen, run.batch(step), run.step_rng(step))
        window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
        window_steps += 1
        done = step + 1
        if done % config.train.log_every == 0 or done == stop:
            scalars = {"train/" + k: v for k, v in _summarise(window).items()}
            scalars["train/grad_norm"] = float(window["grad_norm"]) / window_steps
            scalars["train/tokens_per_s"] = tokens_per_step * window_steps / (time.perf_counter() - window_start)
            speeds.append(scalars["train/tokens_per_s"])
            writer.write(done, scalars)
            bar.update_to(done, loss=scalars["train/loss"], tokens_per_s=scalars["train/tokens_per_s"])
            window, window_steps, window_start = None, 0, time.perf_counter()
        if done % config.train.eval_every == 0 and done != config.train.steps:
            writer.write(done, {f"eval/{k}": v for k, v in run.evaluate(state["trainable"]).items()})
        if done % config.checkpoint.every == 0 or done == stop:
            checkpoints.save(done, state, {**meta, "data_index": done})
    bar.close()
    checkpoints.close()
    final_step = int(state["step"])
    summary = {
        "method": config.adapter.method,
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
    summary["after"] = run.evaluate(state["trainable"])
    summary["tokens_per_s"] = float(np.median(speeds)) if speeds else None
    writer.write(final_step, {f"eval/{k}": v for k, v in summary["after"].items()})
    writer.close()
    if jax.process_index() == 0:
        _export(config, run.model, run.params, run.adapter_cfg, jax.device_get(state["trainable"]), workdir)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(_report(summary, workdir), flush=True)
    return summary


def restore_latest(workdir: str | pathlib.Path) -> tuple[Run, Any, int]:
    """(run, trainable params, step) of the latest checkpoint of the run in ``workdir``."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{config_path}: no such file; is {workdir} the --workdir of a dora_jax.train run?")
    config = run_config.from_flat(json.loads(config_path.read_text()))
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.checkpoint.keep, async_save=False)
    step = checkpoints.latest_step()
    if step is None:
        raise ConfigError(f"{workdir / 'checkpoints'}: no checkpoint yet")
    run = build(config)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), run.state, run.state_sharding
    )
    state, _ = checkpoints.restore(step, abstract)
    checkpoints.close()
    return run, state["trainable"], step


def write_export(fmt: str, out: pathlib.Path, config, model, params, adapter_cfg, trainable) -> pathlib.Path:
    """Writes a run's trained state to ``out``: "peft", the adapter (with a classifier's head), or
    "merged", the HF model with the adapter folded in (for full fine-tuning, the model itself)."""
    if adapter_cfg is None:
        return io.save_hf(model, trainable, out)
    adapters, head = split_trainable(trainable)
    if fmt == "peft":
        return io.export_peft(
            adapters,
            adapter_cfg,
            out,
            model=model,
            base_model_name_or_path=config.model.hf_dir or None,
            head=head,
        )
    return io.save_hf(model, with_head(model, merge(jax.device_get(params), adapters, adapter_cfg), head), out)


def _export(config, model, params, adapter_cfg, trainable, workdir: pathlib.Path) -> None:
    state = (config, model, params, adapter_cfg, trainable)
    if adapter_cfg is None:
        write_export("merged", workdir / "model", *state)
        return
    if config.export.peft:
        write_export("peft", workdir / "adapter", *state)
    if config.export.merged:
        write_export("merged", workdir / "merged", *state)


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
        try:
            return flags.FLAGS(args)
        except (flags.Error, AttributeError, KeyError, ValueError) as err:
            message = str(err).replace("\\n", " ").strip("'\"")
            sys.exit(f"dora_jax.train: bad flag: {message}")

    def run(_):
        logging.basicConfig(level=logging.WARNING)
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
        try:
            train_and_evaluate(config_flag.value, workdir_flag.value)
        except DoraError as err:
            sys.exit(f"dora_jax.train: {err}")

    app.run(run, argv=argv, flags_parser=parse)


if __name__ == "__main__":
    main()
