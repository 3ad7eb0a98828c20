"""Exception types of dora_jax: one per kind of mistake, each message says what and where."""


class DoraError(ValueError):
    """Base class of every error dora_jax raises on bad input."""


class ConfigError(DoraError):
    """An AdapterConfig field (or a config key) has a value outside its valid choices."""


class TargetError(DoraError):
    """A target pattern matches no leaf, or an adapter names a leaf the parameters lack."""


class ShapeError(DoraError):
    """A kernel or adapter has a shape the requested adaptation cannot use."""


class DivergenceError(DoraError):
    """Training produced a non-finite loss or gradient norm (``train.nan_policy="stop"``)."""


class InjectError(DoraError):
    """`inject` was asked not to fall back to `merge`, but a targeted leaf was not intercepted."""
