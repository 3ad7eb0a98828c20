"""VeRA and DVoRA: one pair of frozen random projections shared by every target, two trained vectors per layer.

VeRA (Kopiczko et al., 2024) in the Flax layout, as PEFT's ``VeraModel`` computes it:
``W' = W0 + (A_s diag(lambda_d)) (B_s diag(lambda_b))`` with ``A_s = A[:d_in]`` and ``B_s = B[:, :d_out]``
slices of the shared ``A: (max d_in, r)`` and ``B: (r, max d_out)``, drawn once from
``AdapterConfig.projection_seed`` (Kaiming-uniform, PEFT's bounds: ``sqrt(6 / max d_in)`` for A,
``sqrt(6 / r)`` for B) and never trained. ``lambda_d: (r,)`` starts at ``d_initial``, ``lambda_b: (d_out,)``
at zero, so ``W' == W0`` at init; there is no alpha scale.

DVoRA (DoRA paper section 5.4) puts VeRA's update under DoRA's decomposition:
``W' = m * (W0 + dW_vera) / ||W0 + dW_vera||_c``. Both reuse the LoRA/DoRA forward with the
expanded matrices ``a = A_s diag(lambda_d)``, ``b = B_s diag(lambda_b)`` and ``s = 1``: the factored
path never builds ``W'``, and the norm stays exact (``factored_column_norm``).

The projections live in the adapters tree under ``PROJECTION`` (``{"shared_a", "shared_b"}``), so
an adapter read from a PEFT file (``save_projection``) carries its own; they get no gradient
(``lax.stop_gradient``) and no optimizer update (``optim.group_labels`` labels them "frozen").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PROJECTION = "vera_projection"  # the adapters tree's key for the shared projections
PROJECTION_KEYS = ("shared_a", "shared_b")


def init_projection(seed: int, rank: int, shapes: Iterable[tuple[int, int]], dtype: Any) -> dict[str, jax.Array]:
    """The shared ``{"shared_a": (max d_in, r), "shared_b": (r, max d_out)}`` over the targets' (d_in, d_out)."""
    shapes = list(shapes)
    d_in, d_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    key_a, key_b = jax.random.split(jax.random.key(seed))
    bound_a, bound_b = math.sqrt(6.0 / d_in), math.sqrt(6.0 / rank)  # PEFT: kaiming_uniform(gain sqrt 2), fan_in
    return {
        "shared_a": jax.random.uniform(key_a, (d_in, rank), jnp.float32, -bound_a, bound_a).astype(dtype),
        "shared_b": jax.random.uniform(key_b, (rank, d_out), jnp.float32, -bound_b, bound_b).astype(dtype),
    }


def init_vectors(rank: int, out_shape: tuple[int, ...], d_initial: float, dtype: Any) -> dict[str, jax.Array]:
    """A target's trained vectors: ``lambda_d = d_initial`` (r,), ``lambda_b = 0`` (out_shape)."""
    return {"lambda_d": jnp.full((rank,), d_initial, dtype), "lambda_b": jnp.zeros(out_shape, dtype)}


def projection_of(adapters: Any) -> Mapping[str, jax.Array] | None:
    """The shared projections of a VeRA / DVoRA adapters tree, or None."""
    return adapters.get(PROJECTION) if isinstance(adapters, Mapping) else None


def expand(adapter: Mapping[str, jax.Array], projection: Mapping[str, jax.Array], d_in: int, d_out: int):
    """``a = A[:d_in] diag(lambda_d)`` (d_in, r) and ``b = B[:, :d_out] diag(lambda_b)`` (r, d_out)."""
    shared_a, shared_b = (lax.stop_gradient(projection[k]) for k in PROJECTION_KEYS)
    lambda_d, lambda_b = adapter["lambda_d"], adapter["lambda_b"].reshape(d_out)
    return shared_a[:d_in] * lambda_d, shared_b[:, :d_out] * lambda_b
