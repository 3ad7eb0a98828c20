"""The Optax side: which leaves train, the optimizer of a run, and the one train step.

Two ways to train only some leaves:
- keep them apart: ``partition`` a tree by ``trainable_mask`` and differentiate with respect to
  the trainable half only (``make_train_step``), so the frozen base gets no weight-gradient matmul
  and the optimizer never sees it (what ``dora_jax.train`` does);
- hand a combined tree to ``masked(tx, mask)``: frozen leaves get a zero update and no state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dora_jax import targets
from dora_jax.core import is_adapter, vera


def trainable_mask(tree: Any, extra: str | Iterable[str] = ()) -> Any:
    """Bool tree over ``tree``: True inside adapters (A, B, m; VeRA's vectors) and at leaves whose path
    matches ``extra``; VeRA's shared projections stay False.

    ``extra`` (regexes over '/'-joined paths, matched in full) adds fully trained leaves, e.g. a
    classification head: ``trainable_mask(tree, extra=r"params/classifier/.*")``.
    """
    patterns = [re.compile(p) for p in targets.as_patterns(extra)]

    def label(keypath: Any, node: Any) -> Any:
        if is_adapter(node):
            return {key: True for key in node}
        path = targets.path_str(keypath)
        return not _in_projection(keypath) and any(p.fullmatch(path) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, tree, is_leaf=is_adapter)


def _in_projection(keypath: Any) -> bool:
    """Whether a leaf lies under VeRA's shared projections (frozen, though they travel with the adapters)."""
    return vera.PROJECTION in (targets.key_name(k) for k in keypath)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like ``tree`` with ``None`` where the other has a leaf."""
    trainable = jax.tree.map(lambda leaf, keep: leaf if keep else None, tree, mask)
    frozen = jax.tree.map(lambda leaf, keep: None if keep else leaf, tree, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of ``partition``: each leaf from whichever half holds it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda node: node is None)


def masked(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``mask`` is True; the others get a zero update and no state."""
    labels = jax.tree.map(lambda keep: "trainable" if keep else "frozen", mask)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# The optimizer's parameter groups: A (and VeRA's lambda_d), B (lambda_b), magnitudes, every other trained
# leaf, and the frozen leaves a trainable tree may carry (VeRA's shared projections).
GROUPS = ("a", "b", "m", "other", "frozen")
_GROUP_OF_KEY = {"a": "a", "b": "b", "m": "m", "lambda_d": "a", "lambda_b": "b"}


def group_labels(trainable: Any) -> Any:
    """The label of each trainable leaf: "a", "b" or "m" inside an adapter (VeRA's lambda_d with A,
    lambda_b with B), "frozen" for VeRA's shared projections, "other" elsewhere (a classifier head,
    the weights of full fine-tuning); the label tree ``make_optimizer`` splits by."""

    def label(keypath: Any, node: Any) -> Any:
        if is_adapter(node):
            return {key: _GROUP_OF_KEY[key] for key in node}
        return "frozen" if _in_projection(keypath) else "other"

    return jax.tree_util.tree_map_with_path(label, trainable, is_leaf=is_adapter)


def learning_rate_schedule(train: Any) -> optax.Schedule:
    """Linear warmup from 0 to ``train.learning_rate``, then cosine, linear or constant."""
    decay_steps = max(train.steps - train.warmup_steps, 1)
    end = train.learning_rate * train.end_learning_rate_ratio
    after = {
        "cosine": optax.cosine_decay_schedule(train.learning_rate, decay_steps, alpha=train.end_learning_rate_ratio),
        "linear": optax.linear_schedule(train.learning_rate, end, decay_steps),
        "constant": optax.constant_schedule(train.learning_rate),
    }
    warmup = optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps)
    return optax.join_schedules([warmup, after[train.schedule]], [train.warmup_steps])


def make_optimizer(train: Any, trainable: Any) -> optax.GradientTransformation:
    """AdamW with warmup and a cosine/linear/constant schedule and clipping, from a run's ``config.train``
    (as ``run_config.check`` accepts it), with one learning rate and decay per group (``group_labels``):

    - A: the schedule, decay ``train.weight_decay``;
    - B: the schedule times ``train.loraplus_ratio`` (LoRA+, Hayou et al. 2024), decay ``train.weight_decay``;
    - m: the schedule times ``train.magnitude_lr_ratio``, decay ``train.magnitude_weight_decay``;
    - other leaves: the schedule, decay ``train.weight_decay`` on matrices only (not biases and norms);
    - frozen leaves (VeRA's shared projections): no update and no state.

    VeRA's lambda_d and lambda_b take A's and B's settings.

    Clipping sees the global gradient norm over every group, before the split.
    """
    schedule = learning_rate_schedule(train)

    def adamw(ratio: float, decay: float, mask: Any = None) -> optax.GradientTransformation:
        rate = schedule if ratio == 1.0 else (lambda step: ratio * schedule(step))
        return optax.adamw(rate, weight_decay=decay, mask=mask)

    matrices = functools.partial(jax.tree.map, lambda leaf: leaf.ndim >= 2)
    groups = {
        "a": adamw(1.0, train.weight_decay),
        "b": adamw(train.loraplus_ratio, train.weight_decay),
        "m": adamw(train.magnitude_lr_ratio, train.magnitude_weight_decay),
        "other": adamw(1.0, train.weight_decay, mask=matrices),
        "frozen": optax.set_to_zero(),
    }
    chain = [optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm > 0 else []
    return optax.chain(*chain, optax.multi_transform(groups, group_labels(trainable)))


def init_state(tx: optax.GradientTransformation, trainable: Any) -> dict[str, Any]:
    """The state a train step carries: step count, trainable leaves and their optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}


def make_train_step(
    forward: Callable[[Any, Any, Any, jax.Array | None], jax.Array],
    tx: optax.GradientTransformation,
    metrics: Callable[[jax.Array, Any], dict[str, jax.Array]],
    *,
    grad_accum: int = 1,
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
    """The train step: ``train_step(state, frozen, batch, rng) -> (state, metrics)``, pure; jit it once.

    ``forward(trainable, frozen, batch, rng)`` gives the model's output and ``metrics(output, batch)``
    its sums (``dora_jax.metrics``); the loss is ``sums["loss_sum"] / batch["loss_mask"].sum()``.
    Only ``state["trainable"]`` is differentiated, so the frozen weights get no gradient and no
    optimizer state. ``grad_accum`` > 1 splits the batch into that many micro-batches (a scan) whose
    gradients add up to the whole batch's exactly. Clipping and decay are ``tx``'s
    (``make_optimizer``); the metrics returned are the sums, ``loss`` and ``grad_norm``.
    """

    def loss_fn(trainable, frozen, batch, rng, count):
        sums = metrics(forward(trainable, frozen, batch, rng), batch)
        return sums["loss_sum"] / count, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, frozen, batch, rng):
        # Every micro-batch divides by the whole batch's count, so the summed gradients are exactly
        # the full batch's, whatever the count per micro-batch.
        count = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        if grad_accum == 1:
            (loss, sums), grads = grad_fn(state["trainable"], frozen, batch, rng, count)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                index, micro_batch = xs
                out = grad_fn(state["trainable"], frozen, micro_batch, jax.random.fold_in(rng, index), count)
                return jax.tree.map(jnp.add, carry, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state["trainable"], frozen, first, rng, count)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            ((loss, sums), grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **sums}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return train_step


def make_eval_step(forward: Callable[..., jax.Array], metrics: Callable[[jax.Array, Any], dict[str, jax.Array]]):
    """eval_step(trainable, frozen, batch) -> metrics(output, batch), without dropout."""

    def eval_step(trainable, frozen, batch):
        return metrics(forward(trainable, frozen, batch, None), batch)

    return eval_step
