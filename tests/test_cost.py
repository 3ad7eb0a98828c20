"""XLA's compiled cost: the factored forward's train step does less work than the merge path."""

import pytest

from dora_jax.core import AdapterConfig
from scripts.compare_paths import compiled_cost, compiled_train_step

D, TOKENS, RANK = 1024, 2048, 16


@pytest.mark.parametrize("norm_grad", ["exact", "detach"])
def test_factored_train_step_needs_fewer_flops_than_merge(norm_grad):
    cfg = AdapterConfig(rank=RANK, targets="kernel", norm_grad=norm_grad)
    factored = compiled_cost(compiled_train_step("factored", cfg, D, TOKENS))["flops"]
    merged = compiled_cost(compiled_train_step("merge", cfg, D, TOKENS))["flops"]
    matmul = 2 * TOKENS * D * D  # one x @ W0
    # Factored: the forward matmul plus O(r d (N + d)) adapter work; merge adds the N x d x d weight gradient.
    assert factored < 1.25 * matmul < 2 * matmul < merged
    assert factored / merged < 0.6
