"""AdapterConfig: every choice that defines an adapter, validated when it is built."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from dora_jax.errors import ConfigError, ShapeError

METHODS = ("dora", "lora", "vera", "dvora")
DECOMPOSED = ("dora", "dvora")  # methods with a trained magnitude m
VECTOR_BASED = ("vera", "dvora")  # methods whose update is VeRA's: shared frozen projections, trained vectors
NORM_GRADS = ("exact", "detach")
INITS = ("kaiming_uniform", "gaussian")
FORWARDS = ("factored", "folded")
FALLBACKS = ("merge", "error")


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"AdapterConfig.{field}: expected one of {', '.join(map(repr, choices))}; got {value!r}")


def _rules(field: str, rules: Any, what: str) -> list[tuple[str, Any]]:
    """The (regex, value) pairs of a ``{regex: value}`` field (a mapping or pairs), each regex checked."""
    pairs = list(rules.items() if isinstance(rules, Mapping) else rules)
    for rule in pairs:
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise ConfigError(f"AdapterConfig.{field}: expected {{regex: {what}}} pairs; got {rule!r}")
        _regex(field, rule[0])
    return [tuple(rule) for rule in pairs]


def _regex(field: str, pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"AdapterConfig.{field}: expected a non-empty regex string; got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"AdapterConfig.{field}: {pattern!r} is not a valid regex ({err})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What to adapt and how; hashable, so it can be a static argument of ``jax.jit``.

    Fields:
      method: "dora" (magnitude x low-rank-adapted direction), "lora" (additive low rank), "vera"
        (VeRA: W0 + (A_s diag(lambda_d)) (B_s diag(lambda_b)) with A, B frozen random projections
        shared by every target and sliced to its shape, lambda_d (r,) and lambda_b (d_out,) trained)
        or "dvora" (DoRA's magnitude and normalised direction over VeRA's update).
      rank: r, the inner dimension of A (d_in, r) and B (r, d_out).
      alpha: the LoRA scale numerator; s = alpha / r, or alpha / sqrt(r) with ``rslora``. VeRA and
        DVoRA have no scale (s = 1, as PEFT's VeRA).
      targets: regex (or several) matched in full against '/'-joined leaf paths, e.g.
        r".*/(query|value)/kernel". Each pattern must match at least one leaf.
      magnitude_targets: regex (or several) naming kernels that train the magnitude only (DoRA
        paper section 5.6): their adapter is ``{"m"}`` and the layer computes
        ``(m / ||W0||_c) * (x @ W0) + bias``. "" (the default) or () for none. Needs
        method="dora"; a leaf may not be both a target and a magnitude target.
      dropout: dropout rate on the low-rank branch input during training (0 disables it).
      norm_grad: "exact" differentiates through the column norm; "detach" treats it as a
        constant in backprop (DoRA paper section 4.3, what PEFT does).
      rslora: use s = alpha / sqrt(r) (rank-stabilised LoRA).
      init: how A starts: "kaiming_uniform" (U(+-1/sqrt(d_in)), as PEFT) or "gaussian"
        (N(0, 1/r^2), PEFT's "gaussian"). B always starts at zero.
      dtype: dtype of the adapter parameters (A, B, m), independent of the base weights.
      input_axes: for kernels with more than two axes, {regex: axes} naming the input
        (contracted) axes of the kernels whose path the regex matches in full; the first
        matching rule wins. Two-axis kernels default to (0,), the Flax (d_in, d_out) layout.
      stacked_axes: for kernels stacked along leading axes (layers scanned with ``lax.scan``,
        ``nnx.scan``), {regex: n}: the first n axes of the kernels whose path the regex matches in
        full index the layers. Each layer gets its own adapter, stacked along the same axes, and
        ``input_axes`` name the axes of one layer's kernel; ``inject_fn`` hands a scan over the
        stack each layer's slice. The first matching rule wins; other kernels have none.
      forward: how ``inject`` runs an adapted layer. "factored": (m/n) (x W0 + s (x A) B), no
        d_in x d_out temporary. "folded": s A B is added to the kernel one layer at a time and
        a custom VJP gives the A, B, m gradients without the weight-gradient matmul; two fewer
        passes over the activations per layer, for one transient kernel per layer (see
        ``core.dora.folded_dense``). Same values and gradients; merge paths ignore it.
      projection_seed: VeRA / DVoRA: the seed of the shared projections (PEFT's projection_prng_key).
      d_initial: VeRA / DVoRA: the initial value of every lambda_d entry (PEFT's d_initial);
        lambda_b starts at zero, so W' == W0 at init.
      fallback: what ``inject`` does with a target no Dense/DenseGeneral/Einsum call can route
        (a custom layer, a custom dot_general, ...): "merge" builds its W' into the params (same
        result, the cost the factored forward avoids; ``merged_targets`` lists them), "error"
        raises InjectError.
    """

    method: str = "dora"
    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...]
    magnitude_targets: str | tuple[str, ...] = ""
    dropout: float = 0.0
    norm_grad: str = "detach"
    rslora: bool = False
    init: str = "kaiming_uniform"
    dtype: str = "float32"
    input_axes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    stacked_axes: tuple[tuple[str, int], ...] = ()
    forward: str = "factored"
    fallback: str = "merge"
    projection_seed: int = 0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("norm_grad", self.norm_grad, NORM_GRADS)
        _choice("init", self.init, INITS)
        _choice("forward", self.forward, FORWARDS)
        _choice("fallback", self.fallback, FALLBACKS)
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ConfigError(f"AdapterConfig.rank: expected a positive integer; got {self.rank!r}")
        object.__setattr__(self, "rank", int(self.rank))
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float, np.number))
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise ConfigError(f"AdapterConfig.alpha: expected a positive finite number; got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"AdapterConfig.dropout: expected a rate in [0, 1); got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, (int, np.integer)):
            raise ConfigError(f"AdapterConfig.projection_seed: expected an integer; got {self.projection_seed!r}")
        object.__setattr__(self, "projection_seed", int(self.projection_seed))
        if (
            isinstance(self.d_initial, bool)
            or not isinstance(self.d_initial, (int, float, np.number))
            or not math.isfinite(self.d_initial)
        ):
            raise ConfigError(f"AdapterConfig.d_initial: expected a finite number; got {self.d_initial!r}")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"AdapterConfig.rslora: expected True or False; got {self.rslora!r}")
        self._normalise_targets()
        self._normalise_magnitude_targets()
        self._normalise_dtype()
        self._normalise_input_axes()
        self._normalise_stacked_axes()

    def _normalise_targets(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        try:
            targets = tuple(targets)
        except TypeError:
            raise ConfigError(
                f"AdapterConfig.targets: expected a regex or a sequence of regexes; got {self.targets!r}"
            ) from None
        if not targets:
            raise ConfigError("AdapterConfig.targets: expected at least one regex; got an empty sequence")
        for pattern in targets:
            _regex("targets", pattern)
        object.__setattr__(self, "targets", targets[0] if len(targets) == 1 else targets)

    def _normalise_magnitude_targets(self) -> None:
        patterns = (self.magnitude_targets,) if isinstance(self.magnitude_targets, str) else self.magnitude_targets
        try:
            patterns = tuple(p for p in patterns if p != "")
        except TypeError:
            raise ConfigError(
                "AdapterConfig.magnitude_targets: expected a regex, a sequence of regexes or '' for none; "
                f"got {self.magnitude_targets!r}"
            ) from None
        for pattern in patterns:
            _regex("magnitude_targets", pattern)
        if patterns and self.method != "dora":
            raise ConfigError(
                f"AdapterConfig.magnitude_targets={self.magnitude_targets!r} needs method='dora' (a magnitude-only "
                f"module trains DoRA's m); got method={self.method!r}"
            )
        object.__setattr__(self, "magnitude_targets", patterns[0] if len(patterns) == 1 else patterns or "")

    def _normalise_dtype(self) -> None:
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ConfigError(
                f"AdapterConfig.dtype: expected a floating dtype such as 'float32' or 'bfloat16'; got {self.dtype!r}"
            )
        object.__setattr__(self, "dtype", dtype.name)

    def _normalise_input_axes(self) -> None:
        normalised = []
        for pattern, axes in _rules("input_axes", self.input_axes, "axes"):
            given, axes = axes, (axes,) if isinstance(axes, int) else tuple(axes)
            if (
                not axes
                or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
                or len(set(axes)) != len(axes)
            ):
                raise ConfigError(
                    f"AdapterConfig.input_axes[{pattern!r}]: expected distinct integer axes; got {given!r}"
                )
            normalised.append((pattern, axes))
        object.__setattr__(self, "input_axes", tuple(normalised))

    def _normalise_stacked_axes(self) -> None:
        normalised = []
        for pattern, count in _rules("stacked_axes", self.stacked_axes, "count"):
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
                raise ConfigError(
                    f"AdapterConfig.stacked_axes[{pattern!r}]: expected a positive number of leading axes; "
                    f"got {count!r}"
                )
            normalised.append((pattern, int(count)))
        if normalised and self.vector_based:
            raise ConfigError(
                f"AdapterConfig.stacked_axes needs method 'dora' or 'lora'; got method={self.method!r} (VeRA's "
                "shared projections are sliced to one kernel's shape, not per layer of a stack)"
            )
        object.__setattr__(self, "stacked_axes", tuple(normalised))

    def stacked_for(self, path: str) -> int:
        """How many leading axes of the kernel at ``path`` index a stack of layers (0: none)."""
        return next((count for pattern, count in self.stacked_axes if re.fullmatch(pattern, path)), 0)

    @property
    def scale(self) -> float:
        """s in W0 + s * A @ B: alpha / r, or alpha / sqrt(r) for rsLoRA; 1 for VeRA and DVoRA."""
        if self.vector_based:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def decomposed(self) -> bool:
        """Whether the method trains a magnitude m (DoRA, DVoRA)."""
        return self.method in DECOMPOSED

    @property
    def vector_based(self) -> bool:
        """Whether the update is VeRA's (shared frozen projections, trained lambda_d and lambda_b)."""
        return self.method in VECTOR_BASED

    @property
    def target_patterns(self) -> tuple[str, ...]:
        return (self.targets,) if isinstance(self.targets, str) else self.targets

    @property
    def magnitude_patterns(self) -> tuple[str, ...]:
        """The magnitude-only patterns as a tuple, () when there are none."""
        if isinstance(self.magnitude_targets, str):
            return (self.magnitude_targets,) if self.magnitude_targets else ()
        return self.magnitude_targets

    def axes_for(self, path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The input (contracted) axes of the kernel at ``path``, normalised to be non-negative."""
        ndim = len(shape)
        for pattern, axes in self.input_axes:
            if re.fullmatch(pattern, path):
                if any(not -ndim <= a < ndim for a in axes) or len(axes) >= ndim:
                    raise ShapeError(
                        f"input_axes {axes} for {path!r} do not fit its kernel of shape {shape}: "
                        f"need distinct axes in [-{ndim}, {ndim}) leaving at least one output axis"
                    )
                normalised = tuple(a % ndim for a in axes)
                if len(set(normalised)) != len(normalised):
                    raise ShapeError(f"input_axes {axes} for {path!r} name the same axis twice")
                return normalised
        if ndim == 2:
            return (0,)
        raise ShapeError(
            f"kernel {path!r} has shape {shape} ({ndim} axes): say which axes are the input "
            f"(contracted) ones, e.g. AdapterConfig(input_axes={{{path!r}: (0,)}}); an nn.Conv kernel "
            f"(*window, c_in, c_out) contracts all axes but the last: {tuple(range(ndim - 1))}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (inverse of ``from_dict``)."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.target_patterns) if len(self.target_patterns) > 1 else self.targets
        patterns = self.magnitude_patterns
        out["magnitude_targets"] = list(patterns) if len(patterns) > 1 else self.magnitude_targets
        out["input_axes"] = {pattern: list(axes) for pattern, axes in self.input_axes}
        out["stacked_axes"] = dict(self.stacked_axes)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        """Builds a config from a mapping (e.g. an ml_collections ConfigDict); unknown keys are errors."""
        if hasattr(values, "to_dict"):  # ml_collections.ConfigDict
            values = values.to_dict()
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"AdapterConfig: unknown field(s) {unknown}; valid fields: {fields}")
        kwargs = dict(values)
        for key in ("targets", "magnitude_targets"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        for key in ("input_axes", "stacked_axes"):
            if key in kwargs and isinstance(kwargs[key], Mapping):
                kwargs[key] = tuple(kwargs[key].items())
        return cls(**kwargs)
