"""Adapters on a Flax NNX model, as NNX code reads: ``dj.nnx.Adapted(model, cfg, rngs=...)`` is an
``nnx.Module`` whose call runs ``model`` through ``dj.inject_fn`` (the factored forward, W' never built).

Its adapters are ``dj.nnx.Adapter`` variables (a subclass of ``nnx.Param``), so
``nnx.Optimizer(adapted, tx, wrt=dj.nnx.Adapter)`` and ``nnx.value_and_grad(..., argnums=nnx.DiffState(0,
dj.nnx.Adapter))`` train them and nothing else: the model's own parameters get no gradient and no optimizer
state. ``adapted.adapter_tree()`` is the plain pytree ``dj.merge`` and ``dj.io.export_peft`` take;
``adapted.merged()`` is the model with W' in place (zero-overhead inference).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from dora_jax.core import AdapterConfig, init_adapters, merge
from dora_jax.inject_fn import inject_fn


class Adapter(nnx.Param):
    """The variable type of an adapter's arrays (A, B, m; VeRA's vectors and projections)."""


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


class Adapted(nnx.Module):
    """``model`` (any NNX module) with adapters on the parameters ``cfg.targets`` selects (paths as
    ``nnx.state(model, nnx.Param)`` names them, e.g. ``layers/0/kernel``)."""

    def __init__(self, model: nnx.Module, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        self.model = model
        self.cfg = cfg
        adapters = init_adapters(rngs.params(), nnx.state(model, nnx.Param), cfg)
        self.adapters = nnx.data(jax.tree.map(Adapter, adapters))

    def adapter_tree(self) -> Any:
        """The adapters as a plain pytree of arrays (what ``dj.merge`` and ``dj.io.export_peft`` take)."""
        return jax.tree.map(lambda variable: variable[...], self.adapters, is_leaf=_is_variable)

    def __call__(self, *args, dropout_rng: jax.Array | None = None, **kwargs):
        graph, params, rest = nnx.split(self.model, nnx.Param, ...)

        def fn(params, *args):
            return nnx.merge(graph, params, rest)(*args, **kwargs)

        return inject_fn(fn, self.cfg)(params, self.adapter_tree(), *args, dropout_rng=dropout_rng)

    def merged(self) -> nnx.Module:
        """A new ``model`` whose targeted parameters hold W' (this module is unchanged)."""
        graph, params, rest = nnx.split(self.model, nnx.Param, ...)
        return nnx.merge(graph, merge(params, self.adapter_tree(), self.cfg), rest)
