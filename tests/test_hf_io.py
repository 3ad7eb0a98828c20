"""HF directory import/export without PyTorch: round trips, streaming, DoRA on a zoo model, errors."""

import dataclasses
import json
import tracemalloc

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dora_jax as dj
from conftest import TINY_LLAMA, token_batch
from dora_jax import io, models
from dora_jax.io import CheckpointError

LLAMA = dict(TINY_LLAMA, model_type="llama")


def tiny_llama(directory, seed=0, max_shard_bytes=5 * 2**30, **overrides):
    """A random tiny Llama written with save_hf; returns (model, params)."""
    model = models.from_hf_config(dict(LLAMA, **overrides))
    params = models.init_params(model, jax.random.key(seed))
    io.save_hf(model, params, directory, max_shard_bytes=max_shard_bytes)
    return model, params


def jnp_batch(vocab):
    return tuple(jnp.asarray(a) for a in token_batch(vocab))


def test_save_then_load_is_bit_identical(tmp_path):
    model, params = tiny_llama(tmp_path, tie_word_embeddings=True, attention_bias=True)
    loaded_model, loaded = io.load_hf(tmp_path)
    chex.assert_trees_all_equal(loaded, params)
    assert loaded_model.config == dataclasses.replace(model.config, source=loaded_model.config.source)


def test_sharded_export_reloads_identically(tmp_path):
    _, params = tiny_llama(tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    chex.assert_trees_all_equal(io.load_hf(tmp_path)[1], params)


def test_export_replaces_an_earlier_export_in_place(tmp_path):
    tiny_llama(tmp_path, max_shard_bytes=30_000)
    _, params = tiny_llama(tmp_path, seed=1)  # now one file: the old shards and index must go
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(tmp_path.glob(".partial-*"))
    chex.assert_trees_all_equal(io.load_hf(tmp_path)[1], params)


def test_bf16_checkpoint_loads_into_float32_params_exactly(tmp_path):
    model = models.from_hf_config(LLAMA)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), models.init_params(model, jax.random.key(0)))
    io.save_hf(model, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = io.load_hf(tmp_path, dtype=jnp.float32)
    chex.assert_trees_all_equal(loaded, jax.tree.map(lambda p: p.astype(jnp.float32), params))


def test_bf16_compute_over_float32_params_is_finite_and_close(tmp_path):
    tiny_llama(tmp_path)
    model, params = io.load_hf(tmp_path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    ids, mask = jnp_batch(LLAMA["vocab_size"])
    logits = model.apply({"params": params}, ids, attention_mask=mask)
    reference = model.clone(dtype=jnp.float32).apply({"params": params}, ids, attention_mask=mask)
    assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()
    np.testing.assert_allclose(np.asarray(logits, np.float32), reference, atol=0.05)


def test_loading_streams_tensors_instead_of_reading_the_files_whole(tmp_path):
    config = dict(LLAMA, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=2048)
    tiny_llama(tmp_path, **config)
    total = sum(array.nbytes for array in load_file(tmp_path / "model.safetensors").values())
    largest = max(array.nbytes for array in load_file(tmp_path / "model.safetensors").values())
    tracemalloc.start()
    io.load_hf(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 12 * largest / 2
    assert peak < total / 3, (peak, total, largest)  # host copies: about one tensor at a time


def test_dora_on_the_tiny_llama_is_the_identity_at_init_and_equals_merge(tmp_path):
    tiny_llama(tmp_path)
    model, params = io.load_hf(tmp_path)
    cfg = dj.AdapterConfig(rank=4, targets=r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel")
    adapters = dj.init_adapters(jax.random.key(0), params, cfg)
    assert len(dj.core.adapter_entries(adapters)) == 5 * LLAMA["num_hidden_layers"]
    ids, mask = jnp_batch(LLAMA["vocab_size"])
    f = dj.inject(model.apply, cfg, fallback="error")
    base = model.apply({"params": params}, ids, attention_mask=mask)
    np.testing.assert_allclose(f(params, adapters, ids, attention_mask=mask), base, rtol=1e-5, atol=1e-5)
    moved = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), adapters)
    merged = model.apply({"params": dj.merge(params, moved, cfg)}, ids, attention_mask=mask)
    np.testing.assert_allclose(f(params, moved, ids, attention_mask=mask), merged, rtol=1e-4, atol=1e-4)
    assert np.abs(merged - base).max() > 1e-2


def test_logical_axes_cover_every_parameter():
    model = models.from_hf_config(LLAMA)
    specs = jax.tree.leaves(models.logical_axes(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(jax.tree.leaves(models.abstract_params(model)))
    assert jax.sharding.PartitionSpec("embed", "heads") in specs and jax.sharding.PartitionSpec("mlp", "embed") in specs


# --- bad input ---------------------------------------------------------------------------------


def write_config(directory, **config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def test_unsupported_model_type_names_the_file_and_the_choices(tmp_path):
    write_config(tmp_path, model_type="gpt2")
    with pytest.raises(dj.ConfigError, match=r"config.json: model_type 'gpt2' is not supported; supported: \['llama'"):
        io.load_hf(tmp_path)


def test_unsupported_rope_type_names_the_choices(tmp_path):
    write_config(tmp_path, **LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(
        dj.ConfigError, match=r"rope_type 'yarn' is not supported; supported: \('default', 'linear', 'llama3'\)"
    ):
        io.load_hf(tmp_path)


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: no such file"):
        io.load_hf(tmp_path)


def test_missing_safetensors_is_named(tmp_path):
    write_config(tmp_path, **LLAMA)
    with pytest.raises(CheckpointError, match=r"no \*.safetensors file"):
        io.load_hf(tmp_path)


def test_missing_tensor_names_the_tensor_and_the_leaf(tmp_path):
    tiny_llama(tmp_path)
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "layers.1.mlp.up_proj" not in k}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' \(Flax leaf 'layers_1/mlp/up_proj/kernel'"
    ):
        io.load_hf(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    tiny_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 120
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        dj.ShapeError,
        match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 112\), "
        r"but config.json implies \(64, 120\)",
    ):
        io.load_hf(tmp_path)


def test_index_listing_a_missing_shard_is_named(tmp_path):
    tiny_llama(tmp_path, max_shard_bytes=30_000)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(CheckpointError, match=rf"lists {first.name}, which is not in"):
        io.load_hf(tmp_path)


def test_corrupt_safetensors_file_is_named(tmp_path):
    write_config(tmp_path, **LLAMA)
    (tmp_path / "model.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a safetensors file \(header is not JSON"):
        io.load_hf(tmp_path)


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer.json: no such file"):
        io.load_tokenizer(tmp_path)
