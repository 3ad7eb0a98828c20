"""XLA's compiled cost: factored and folded train steps do less work than the merge path; remat recomputes layers."""

import pytest

from conftest import TINY_LLAMA
from dora_jax.core import AdapterConfig
from scripts.compare_paths import compiled_cost, compiled_train_step

D, TOKENS, RANK = 1024, 2048, 16


@pytest.mark.parametrize("path", ["factored", "folded"])
@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_adapter_train_step_needs_fewer_flops_than_merge(path, norm_grad):
    cfg = AdapterConfig(rank=RANK, targets="kernel", norm_grad=norm_grad)
    adapted = compiled_cost(compiled_train_step(path, cfg, D, TOKENS))["flops"]
    merged = compiled_cost(compiled_train_step("merge", cfg, D, TOKENS))["flops"]
    matmul = 2 * TOKENS * D * D  # one x @ W0
    # Factored and folded: the forward matmul plus O(r d (N + d)) adapter work; merge adds the N x d x d
    # weight gradient (the folded VJP's W0 gradient is dead code: W0 is frozen).
    assert adapted < 1.25 * matmul < 2 * matmul < merged
    assert adapted / merged < 0.6


def remat_grad(remat: str):
    """The jitted DoRA gradient of a 2-layer Llama's next-token loss on 2 x 64 tokens, with ``remat``."""
    import jax
    import jax.numpy as jnp

    import dora_jax as dj
    from dora_jax import models

    hf = dict(TINY_LLAMA, model_type="llama", num_hidden_layers=2)
    model = models.from_hf_config(hf, remat=remat)
    params = models.init_params(models.from_hf_config(hf), jax.random.key(0))
    cfg = AdapterConfig(rank=4, targets=r".*/(q_proj|v_proj|up_proj|down_proj)/kernel", norm_grad="exact")
    adapters = jax.tree.map(lambda a: a + 0.01, dj.init_adapters(jax.random.key(1), params, cfg))
    ids = jax.random.randint(jax.random.key(2), (2, 64), 0, hf["vocab_size"])
    adapted = dj.inject(model.apply, cfg, fallback="error")

    def loss(adapters):
        logits = adapted(params, adapters, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    return grad, adapters


def test_remat_recomputes_each_layer_and_gives_the_same_gradients():
    """XLA:CPU's memory_analysis does not show the saving (its buffer reuse is poor at any setting); GPU/TPU do."""
    import jax
    import numpy as np

    grads = {}
    for remat in ("none", "dots", "full"):
        grad, adapters = remat_grad(remat)
        assert str(jax.make_jaxpr(grad)(adapters)).count("remat") == (0 if remat == "none" else 2)  # one per layer
        grads[remat] = grad(adapters)
    for remat in ("dots", "full"):
        for ours, reference in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"]), strict=True):
            np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


def test_remat_names_its_choices_and_the_family_it_supports():
    from dora_jax import models
    from dora_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"remat: expected one of \['dots', 'full', 'none'\]; got 'some'"):
        models.from_hf_config(dict(TINY_LLAMA, model_type="llama"), remat="some")
    with pytest.raises(ConfigError, match=r"remat='full' is supported for the Llama family, not model_type 'bert'"):
        models.from_hf_config(dict(model_type="bert", vocab_size=10), remat="full")


def stack_temp_bytes(dense, method: str, layers: int, tokens: int = 64, width: int = 512) -> int:
    """Compiled temporary bytes of the adapter gradient of ``layers`` tanh(dense) layers, width x width each."""
    import jax
    import jax.numpy as jnp

    from dora_jax.core import init_adapter

    cfg = AdapterConfig(targets="k", rank=8, method=method, norm_grad="exact")
    kernels = [jax.random.normal(jax.random.key(i), (width, width)) / width**0.5 for i in range(layers)]
    adapters = [
        jax.tree.map(lambda t: t + 0.01, init_adapter(jax.random.key(100 + i), w, cfg)) for i, w in enumerate(kernels)
    ]
    x = jax.random.normal(jax.random.key(99), (tokens, width))

    def loss(adapters):
        h = x
        for kernel, adapter in zip(kernels, adapters, strict=True):
            h = jnp.tanh(dense(h, kernel, adapter, cfg))
        return jnp.mean(h**2)

    return jax.jit(jax.grad(loss)).lower(adapters).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("path", ["factored", "folded"])
def test_no_layer_holds_a_weight_sized_buffer_across_the_step(path, method):
    # Each extra layer may add its saved activations (a few tokens x width arrays, 1/8 of a kernel
    # each here), not a width x width kernel: XLA:CPU used to build every layer's W' (folded) or
    # W0 m/n (factored backward) at once and hold them all.
    from dora_jax.core import factored_dense, folded_dense

    dense = {"factored": factored_dense, "folded": folded_dense}[path]
    per_layer = (stack_temp_bytes(dense, method, 8) - stack_temp_bytes(dense, method, 4)) / 4
    assert per_layer < 0.5 * 512 * 512 * 4
