"""The synthetic source behind the default config: deterministic, resumable, host-sharded batches."""

import numpy as np

from dora_jax import data as data_lib
from dora_jax import run_config


def synthetic_source(seed=0):
    c = run_config.defaults()
    c.seed = seed
    return data_lib.make_source(c)


def test_same_seed_and_index_give_the_same_batch_in_a_new_source():
    """A restored run asks for batch ``index`` again: the iterator position is the index alone."""
    for index in (0, 1, 57):
        a, b = synthetic_source().batch(index, 32), synthetic_source().batch(index, 32)
        for key in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(synthetic_source().batch(0, 32)["inputs"], synthetic_source().batch(1, 32)["inputs"])
    assert not np.array_equal(synthetic_source(0).batch(0, 32)["inputs"], synthetic_source(1).batch(0, 32)["inputs"])


def test_two_hosts_see_disjoint_halves_of_the_global_batch():
    source = synthetic_source()
    whole = source.batch(3, 32)
    halves = [source.batch(3, 32, process_index=host, process_count=2) for host in (0, 1)]
    assert [h["inputs"].shape[0] for h in halves] == [16, 16]
    for key in ("inputs", "targets", "loss_mask"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    rows = [{row.tobytes() for row in h["inputs"]} for h in halves]
    assert not rows[0] & rows[1]


def test_evaluation_batches_are_a_separate_deterministic_stream():
    source = synthetic_source()
    evaluation = source.eval_batches()
    assert len(evaluation) == 4 and all(batch["inputs"].shape[0] == 128 for batch in evaluation)
    for index, batch in enumerate(evaluation):  # not the training batch of the same index
        assert not np.array_equal(batch["inputs"], source.batch(index, 128)["inputs"])
    np.testing.assert_array_equal(evaluation[0]["inputs"], synthetic_source().eval_batches()[0]["inputs"])
