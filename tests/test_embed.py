"""Adapted embedding tables: the lookup and the tied head (``nn.Embed.attend``) through ``inject``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax as dj
from conftest import perturb


class TiedLM(nn.Module):
    """An embedding, a Dense, and logits from the same table (``attend``): a tied head."""

    @nn.compact
    def __call__(self, ids):
        table = nn.Embed(20, 8, name="embed")
        return table.attend(nn.gelu(nn.Dense(8, name="mix")(table(ids))))


@pytest.fixture(scope="module")
def tied():
    model, ids = TiedLM(), jnp.array([[1, 2, 3, 19], [0, 5, 5, 7]])
    return model, model.init(jax.random.key(0), ids)["params"], ids


def test_an_embedding_adapter_starts_as_peft_does_and_leaves_the_model_unchanged(tied):
    model, params, ids = tied
    cfg = dj.AdapterConfig(rank=3, targets="embed/embedding")
    adapter = dj.init_adapters(jax.random.key(1), params, cfg)["embed"]["embedding"]
    assert adapter["a"].shape == (20, 3) and not adapter["a"].any()  # PEFT: A zero, B standard normal
    assert adapter["b"].shape == (3, 8) and 0.5 < float(jnp.std(adapter["b"])) < 1.5
    np.testing.assert_allclose(adapter["m"], np.linalg.norm(params["embed"]["embedding"], axis=0), rtol=1e-6)
    adapters = {"embed": {"embedding": adapter}}
    base = model.apply({"params": params}, ids)
    np.testing.assert_allclose(dj.inject(model.apply, cfg, fallback="error")(params, adapters, ids), base, atol=1e-6)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dora", {}),
        ("lora", {}),
        ("dvora", {"rank": 6}),
        ("dora", {"targets": "mix/kernel", "magnitude_targets": "embed/embedding"}),
    ],
    ids=["dora", "lora", "dvora", "magnitude_only"],
)
def test_lookup_and_tied_head_equal_the_merged_table_in_values_and_gradients(tied, method, extra):
    model, params, ids = tied
    cfg = dj.AdapterConfig(**{"method": method, "rank": 3, "targets": "embed/embedding|mix/kernel", **extra})
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    assert dj.merged_targets(model.apply, cfg, params, adapters, ids) == {}  # both calls routed, W' never built

    def injected(a):
        return dj.inject(model.apply, cfg)(params, a, ids)

    def merged(a):
        return model.apply({"params": dj.merge(params, a, cfg)}, ids)

    np.testing.assert_allclose(injected(adapters), merged(adapters), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(2), injected(adapters).shape)  # a linear loss: no amplified rounding
    grads = [jax.grad(lambda a, f=f: jnp.sum(weights * f(a)))(adapters) for f in (injected, merged)]
    # float32 sums over the batch: compare to 1e-6 of the largest entry of each gradient
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5 + 1e-6 * float(jnp.abs(v).max())), *grads)


class TwoContractions(nn.Module):
    """One nn.Einsum read twice: a plain contraction, then one that also sums an output letter away."""

    @nn.compact
    def __call__(self, x):
        layer = nn.Einsum((4, 3), use_bias=False, name="proj")
        return layer(x, "ab,bc->ac") + layer(x, "ab,bc->a")[:, None]


def test_a_leaf_one_call_cannot_route_is_merged_for_every_call():
    model, x = TwoContractions(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    cfg = dj.AdapterConfig(rank=2, targets="proj/kernel")
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    assert "proj/kernel" in dj.merged_targets(model.apply, cfg, params, adapters, x)
    expected = model.apply({"params": dj.merge(params, adapters, cfg)}, x)  # both calls see W'
    np.testing.assert_allclose(dj.inject(model.apply, cfg)(params, adapters, x), expected, atol=1e-6)
