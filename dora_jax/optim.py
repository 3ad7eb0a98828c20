"""The Optax side: which leaves train, and optimizers that keep state only for those.

Two ways to train only the adapters:
- keep them apart: differentiate the loss with respect to the adapters (or the trainable half
  of ``partition``) only, so the frozen base gets no weight-gradient matmul and the optimizer
  never sees it (what ``dora_jax.train`` does);
- hand a combined tree to ``masked(tx, mask)``: frozen leaves get a zero update and no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax

from dora_jax import targets
from dora_jax.core import is_adapter


def trainable_mask(tree: Any, extra: str | Iterable[str] = ()) -> Any:
    """Bool tree over ``tree``: True inside adapters (A, B, m) and at leaves whose path matches ``extra``.

    ``extra`` (regexes over '/'-joined paths, matched in full) adds fully trained leaves, e.g. a
    classification head: ``trainable_mask(tree, extra=r"params/classifier/.*")``.
    """
    patterns = [re.compile(p) for p in targets.as_patterns(extra)]

    def label(keypath: Any, node: Any) -> Any:
        if is_adapter(node):
            return {key: True for key in node}
        path = targets.path_str(keypath)
        return any(p.fullmatch(path) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, tree, is_leaf=is_adapter)


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


def make_train_step(
    loss_fn: Callable[[Any, Any, Any, jax.Array], jax.Array], tx: optax.GradientTransformation
) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """A pure step ``(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, loss)``.

    ``loss_fn(trainable, frozen, batch, rng)`` returns a scalar. Only ``trainable`` is
    differentiated, so no gradient is ever formed for the frozen weights; jit the result once.
    """

    def step(trainable: Any, frozen: Any, opt_state: Any, batch: Any, rng: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step
