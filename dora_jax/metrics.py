"""What a step measures: the sums behind a batch's loss and scores, and their summaries.

A metrics function ``metrics(output, batch)`` returns sums over the batch, never means, so that
micro-batches, evaluation batches and hosts add up exactly. ``"loss_sum"`` is the summed loss; a
step divides it by ``batch["loss_mask"].sum()`` of the whole batch (``optim.make_train_step``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position, in float32: (batch, seq)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def sequence_logprobs(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Summed log-probability of each row's loss-masked target tokens: (rows,)."""
    return (token_logprobs(logits, batch["targets"]) * batch["loss_mask"]).sum(-1)


def lm_metrics(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The sums behind masked next-token loss, token accuracy and exact match of a batch."""
    mask = batch["loss_mask"]
    correct = (logits.argmax(-1) == batch["targets"]) * mask
    scored = mask.sum(-1) > 0
    return {
        "loss_sum": -(token_logprobs(logits, batch["targets"]) * mask).sum(),
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
        "loss_sum": -(token_logprobs(logits, labels) * mask).sum(),
        "correct": ((predicted == labels) * mask).sum(),
        "examples": mask.sum(),
        "true_pos": (is_label * is_predicted).sum(0),
        "false_pos": ((1 - is_label) * is_predicted).sum(0),
        "false_neg": (is_label * (1 - is_predicted)).sum(0),
    }


def squared_error(output: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Regression to ``batch["targets"]``: the squared error averaged over the last axis, summed over
    the positions ``batch["loss_mask"]`` (shaped like ``output`` without its last axis) keeps."""
    error = jnp.mean(jnp.square(output.astype(jnp.float32) - batch["targets"]), axis=-1)
    return {"loss_sum": (error * batch["loss_mask"]).sum(), "count": batch["loss_mask"].sum()}


def lm_summary(sums: dict[str, Any]) -> dict[str, float]:
    """Mean loss per token, token accuracy and exact match of ``lm_metrics`` sums."""
    sums = {k: float(v) for k, v in sums.items()}
    return {
        "loss": sums["loss_sum"] / max(sums["tokens"], 1.0),
        "token_accuracy": sums["correct"] / max(sums["tokens"], 1.0),
        "exact_match": sums["exact"] / max(sums["sequences"], 1.0),
    }


def classification_summary(sums: dict[str, Any]) -> dict[str, float]:
    """Loss, accuracy, macro F1 and (two labels) the F1 of label 1, as GLUE reports for MRPC and QQP."""
    tp, fp, fn = (np.asarray(sums[k], np.float64) for k in ("true_pos", "false_pos", "false_neg"))
    f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1.0), 0.0)
    examples = max(float(sums["examples"]), 1.0)
    out = {"loss": float(sums["loss_sum"]) / examples, "accuracy": float(sums["correct"]) / examples}
    out["macro_f1"] = float(f1.mean())
    if len(f1) == 2:
        out["f1"] = float(f1[1])
    return out


def summarise(sums: dict[str, Any]) -> dict[str, float]:
    """The summary of ``lm_metrics`` or ``classification_metrics`` sums, whichever they are."""
    return classification_summary(sums) if "examples" in sums else lm_summary(sums)
