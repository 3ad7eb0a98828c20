"""Small Flax models shared by the tests: an MLP of Dense layers and an attention block."""

import os
import pathlib
import shutil
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The suite's time goes into compiling many small programs, not running them: LLVM's -O0 halves
# XLA:CPU's compile time (the same HLO, buffers and results; slower kernels), and XLA:CPU's older loop
# emitters for fusions compile a small program in about half the time again (the whole suite 19.5 ->
# 11 min, 2026-11-30); JAX 0.11's XLA no longer has that flag (an unknown flag is fatal), so it is set
# for JAX 0.10 only. Set before any test initialises the backend; subprocesses inherit them (the README
# command's test removes them, and the cache below).
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if jax.__version_info__ < (0, 11):
    TEST_XLA_FLAG += " --xla_cpu_use_fusion_emitters=false"
if TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

# Many processes compile the same programs: both pytest-xdist workers and the CLI, notebook and
# multi-device subprocesses (e.g. the default run's train step). XLA's persistent compilation cache in
# one directory per session shares every compiled program between them. No size limit: a limit makes
# every write scan the directory (thousands of entries). An entry read while another process is still
# writing it fails to decompress, which JAX reports as a warning and compiles instead. The process that
# makes the directory (the xdist controller) removes it at the end.
CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dora_jax_tests_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_sessionfinish(session):
    if CACHE_OWNER and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_command(argv, env=None, timeout=600):
    """Runs ``argv`` in the repository root as a user would (text output captured) and asserts it succeeded,
    showing the end of its stderr otherwise."""
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# How pytest-xdist shares the suite between its two processes (scripts/test.sh): each test file is a
# unit of work (its module fixtures built once), and units start in this order, the slowest first,
# then the other files alphabetically (`--no-loadscope-reorder` keeps it): started last, a long file
# would run alone at the end while the other process idles.
SLOWEST_FIRST = (
    "test_notebooks.py",
    "test_multidevice.py",
    "test_benchmark.py",
    "test_train.py",
    "test_dora_math.py",
    "test_classification.py",
    "test_evaluate.py",
    "test_generate.py",
    "test_attention.py",
    "test_reliability.py",
    "test_peft_interop.py",
    "test_folded.py",
    "test_cost.py",
    "test_conv.py",
    "test_memory_plan.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# HF config kwargs of the tiny models the HF, PEFT and I/O tests build.
TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TINY_BERT = dict(
    vocab_size=100,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
)


def token_batch(vocab, pad_id=0, seq=12, padded=4):
    """(ids, mask) numpy arrays of two rows; the second row ends in ``padded`` padding tokens."""
    ids = np.random.default_rng(0).integers(2, vocab, size=(2, seq))
    mask = np.ones((2, seq), np.int32)
    mask[1, -padded:] = 0
    ids[1, -padded:] = pad_id
    return ids, mask


class MLP(nn.Module):
    """Two Dense layers with a GELU, as in a transformer feed-forward block."""

    hidden: int = 32
    features: int = 12
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, name="up", dtype=self.dtype)(x)
        x = nn.gelu(x)
        return nn.Dense(self.features, name="down", dtype=self.dtype)(x)


class Attention(nn.Module):
    """Self-attention whose projections are DenseGeneral kernels (d, h, k) and (h, k, d)."""

    heads: int = 4
    head_dim: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name, dtype=self.dtype)  # noqa: E731
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / self.head_dim**0.5, axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out", dtype=self.dtype)(attended)


ATTENTION_AXES = {r".*/(query|key|value)/kernel": (0,), r".*/out/kernel": (0, 1)}


class Block(nn.Module):
    """Attention then MLP, with residuals: a transformer layer without norms."""

    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attention", dtype=self.dtype)(x)
        return x + MLP(hidden=48, features=x.shape[-1], name="mlp", dtype=self.dtype)(x)


@pytest.fixture
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (4, 16))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


@pytest.fixture
def block():
    model = Block()
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def perturb(adapters, key=3, scale=0.3):
    """Adapters moved away from their init (B != 0, m != ||W0||) so that tests see real adaptation;
    VeRA's shared projections (frozen) stay as they are."""
    frozen = {k: v for k, v in adapters.items() if k == "vera_projection"}
    leaves, treedef = jax.tree.flatten({k: v for k, v in adapters.items() if k not in frozen})
    keys = jax.random.split(jax.random.key(key), len(leaves))
    moved = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys, strict=True)]
    return {**jax.tree.unflatten(treedef, moved), **frozen}


def load_config(path, argument):
    """``get_config(argument)`` of a config file, as ``--config=path:argument`` loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", pathlib.Path(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument)
