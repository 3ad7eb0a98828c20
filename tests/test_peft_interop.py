"""PEFT adapters both ways and merged HF export, checked against PEFT and transformers in PyTorch."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import dora_jax as dj
from conftest import TINY_BERT, TINY_LLAMA, token_batch
from dora_jax import io, metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA, BERT = TINY_LLAMA, TINY_BERT
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA, r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel"),
    "bert": ("BertConfig", "BertModel", BERT, r".*/attention/(query|value)/kernel|.*/output/dense/kernel"),
}


def hf_model(directory, family):
    config_name, model_name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs, attn_implementation="eager"))
    model.eval().save_pretrained(directory, safe_serialization=True)
    return model


def torch_output(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def assert_same_outputs(model, params, adapters, cfg, torch_model, ids, mask):
    """Our adapted model and ``torch_model`` agree on the unpadded tokens (1e-4); returns our outputs."""
    ours = np.asarray(dj.inject(model.apply, cfg)(params, adapters, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], torch_output(torch_model, ids, mask)[keep], rtol=1e-4, atol=1e-4)
    return ours


def trained_adapters(model, params, cfg, ids, mask, steps=3):
    """A few AdamW steps on a fixed regression target so that B != 0 and m has moved."""
    f = dj.inject(model.apply, cfg)
    target = jax.random.normal(jax.random.key(9), model.apply({"params": params}, ids, attention_mask=mask).shape)

    def forward(adapters, frozen, batch, rng):
        return f(frozen, adapters, batch["inputs"], attention_mask=batch["attention_mask"])

    tx = optax.adamw(1e-2)
    step = jax.jit(dj.optim.make_train_step(forward, tx, metrics.squared_error))
    state = dj.optim.init_state(tx, dj.init_adapters(jax.random.key(0), params, cfg))
    batch = {"inputs": ids, "attention_mask": mask, "targets": target, "loss_mask": jnp.ones(target.shape[:-1])}
    for i in range(steps):
        state, _ = step(state, params, batch, jax.random.key(i))
    return state["trainable"]


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", ["dora", "lora"])
def test_jax_adapters_load_in_peft_with_the_same_outputs(tmp_path, family, method):
    reference = hf_model(tmp_path / "base", family)
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(method=method, rank=4, alpha=8, targets=FAMILIES[family][3])
    ids, mask = token_batch(FAMILIES[family][2]["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    assert (
        float(jnp.abs(dj.core.adapter_entries(adapters)[next(iter(dj.core.adapter_entries(adapters)))]["b"]).max()) > 0
    )
    io.export_peft(adapters, cfg, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora") and config["peft_type"] == "LORA" and config["r"] == 4
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ours = assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs((ours - base)[mask.astype(bool)]).max() > 1e-3  # the adapter really changes the model


def peft_trained(directory, family, use_dora):
    """A PEFT adapter whose B and magnitude are moved off their init, saved by PEFT itself."""
    reference = hf_model(directory / "base", family)
    modules = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"]}[family]
    config = peft.LoraConfig(r=4, lora_alpha=16, use_dora=use_dora, use_rslora=True, target_modules=modules)
    adapted = peft.get_peft_model(reference, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    adapted.eval().save_pretrained(directory / "adapter")
    return adapted


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("use_dora", [True, False])
def test_peft_adapters_import_with_the_same_outputs(tmp_path, family, use_dora):
    adapted = peft_trained(tmp_path, family, use_dora)
    model, params = io.load_hf(tmp_path / "base")
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert cfg.method == ("dora" if use_dora else "lora") and cfg.rslora and cfg.scale == 8.0
    ids, mask = token_batch(FAMILIES[family][2]["vocab_size"], seq=10, padded=3)
    assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)


@pytest.mark.parametrize("use_dora", [True, False])
def test_peft_sequence_classifier_imports_with_its_head(tmp_path, use_dora):
    """PEFT's SEQ_CLS adapter (modules_to_save classifier) -> our adapters + head, the same logits."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**BERT, num_labels=3, attn_implementation="eager")
    transformers.BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "base")
    reference = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=use_dora, target_modules=["query", "value"])
    adapted = peft.get_peft_model(reference, lora)
    torch.manual_seed(1)
    with torch.no_grad():  # adapters and the trained head both moved off their init
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    adapted.eval().save_pretrained(tmp_path / "adapter")

    model, params = io.load_hf(tmp_path / "base", num_labels=3)
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    head = io.read_peft_head(tmp_path / "adapter")
    assert cfg.method == ("dora" if use_dora else "lora") and head["kernel"].shape == (BERT["hidden_size"], 3)
    assert np.abs(np.asarray(head["bias"]) - np.asarray(params["classifier"]["bias"])).max() > 1e-3  # the trained one
    ids, mask = token_batch(BERT["vocab_size"], seq=10, padded=3)
    ours = dj.inject(model.apply, cfg)(
        {**params, "classifier": head}, adapters, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(ours), torch_output(adapted, ids, mask), rtol=1e-4, atol=1e-4)


def test_adapter_without_a_head_reads_no_head(adapter_dir):
    directory, _, _ = adapter_dir
    assert io.read_peft_head(directory) is None


def test_import_then_export_keeps_every_tensor_byte_for_byte(tmp_path):
    peft_trained(tmp_path, "llama", use_dora=True)
    model, params = io.load_hf(tmp_path / "base")
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    io.export_peft(adapters, cfg, tmp_path / "again", model=model)
    original = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(original) == sorted(again)
    for key in original:
        assert original[key].dtype == again[key].dtype and original[key].tobytes() == again[key].tobytes(), key
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_merged_export_loads_in_transformers_without_peft(tmp_path, family):
    hf_model(tmp_path / "base", family)
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(rank=4, alpha=8, targets=FAMILIES[family][3])
    ids, mask = token_batch(FAMILIES[family][2]["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    io.save_hf(model, dj.merge(params, adapters, cfg), tmp_path / "merged")
    merged = getattr(transformers, FAMILIES[family][1]).from_pretrained(tmp_path / "merged").eval()
    assert_same_outputs(model, params, adapters, cfg, merged, ids, mask)


def test_magnitude_only_modules_load_in_peft_and_import_back(tmp_path):
    # The paper's Table 6 placement: direction (A, B) on q, k, v; magnitude alone on o, gate, up, down.
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(
        rank=4,
        alpha=8,
        targets=r".*/(q_proj|k_proj|v_proj)/kernel",
        magnitude_targets=r".*/(o_proj|gate_proj|up_proj|down_proj)/kernel",
    )
    ids, mask = token_batch(LLAMA["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    io.export_peft(adapters, cfg, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"down_proj": 1, "gate_proj": 1, "o_proj": 1, "up_proj": 1}
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ours = assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs((ours - base)[mask.astype(bool)]).max() > 1e-3
    imported, imported_cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert imported_cfg.magnitude_targets == r".*/(down_proj|gate_proj|o_proj|up_proj)/kernel"
    assert jax.tree.structure(imported) == jax.tree.structure(adapters)
    jax.tree.map(np.testing.assert_array_equal, imported, adapters)


def test_partial_layer_selection_exports_a_regex_that_peft_honours(tmp_path):
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(rank=4, targets=r"layers_1/self_attn/q_proj/kernel")
    ids, mask = token_batch(LLAMA["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    io.export_peft(adapters, cfg, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"model\.layers\.1\.self_attn\.q_proj"
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)
    _, imported_cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert imported_cfg.targets == r"layers_1/self_attn/q_proj/kernel"


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path):
    peft_trained(tmp_path, "llama", use_dora=True)
    model, params = io.load_hf(tmp_path / "base")
    return tmp_path / "adapter", model, params


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fan_in_fan_out": True}, r"fan_in_fan_out=True is not supported"),
        ({"bias": "all"}, r"bias='all' is not supported \(supported: 'none'\)"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        (
            {"rank_pattern": {"q_proj": 8}},
            r"rank_pattern \{'q_proj': 8\} gives module 'model.layers.0.self_attn.q_proj' a rank of its own",
        ),
        ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported; supported: \['LORA', 'VERA'\]"),
    ],
)
def test_unsupported_peft_options_are_refused(adapter_dir, changes, message):
    directory, model, params = adapter_dir
    edit_config(directory, **changes)
    with pytest.raises(dj.ConfigError, match=message):
        io.import_peft(directory, params, model=model)


def test_key_that_maps_to_no_kernel_is_named(adapter_dir):
    directory, model, params = adapter_dir
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        dj.TargetError, match=r"key 'base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight' maps"
    ):
        io.import_peft(directory, params, model=model)


def test_shape_mismatch_names_the_key_and_both_shapes(adapter_dir):
    directory, model, params = adapter_dir
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = np.zeros((64, 4), np.float32)
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        dj.ShapeError,
        match=r"'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight' has shape \(64, 4\); "
        r"r=4 and the kernel 'layers_0/self_attn/v_proj/kernel' of shape \(64, 32\) need \(32, 4\)",
    ):
        io.import_peft(directory, params, model=model)


def test_magnitude_missing_from_a_dora_adapter_is_named(adapter_dir):
    directory, model, params = adapter_dir
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    save_file(tensors, directory / "adapter_model.safetensors")
    with pytest.raises(
        io.CheckpointError, match=r"module 'model.layers.0.self_attn.q_proj' lacks \[.*lora_magnitude_vector'\]"
    ):
        io.import_peft(directory, params, model=model)


# --- VeRA and DVoRA -----------------------------------------------------------------------------

VERA_MODULES = ["q_proj", "v_proj", "down_proj"]
VERA_TARGETS = r".*/(q_proj|v_proj|down_proj)/kernel"


def test_vera_adapters_load_in_peft_and_import_back(tmp_path):
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(method="vera", rank=16, targets=VERA_TARGETS)
    ids, mask = token_batch(LLAMA["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    io.export_peft(adapters, cfg, tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] and config["r"] == 16
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ours = assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs((ours - base)[mask.astype(bool)]).max() > 1e-3
    imported, imported_cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert imported_cfg == dataclasses.replace(cfg, targets=r".*/(down_proj|q_proj|v_proj)/kernel")
    jax.tree.map(np.testing.assert_array_equal, imported, adapters)


def test_peft_vera_initialises_as_ours_and_imports_with_the_same_outputs(tmp_path):
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    config = peft.VeraConfig(r=16, target_modules=VERA_MODULES, save_projection=True, projection_prng_key=7)
    adapted = peft.get_peft_model(reference, config)
    ours = dj.init_adapters(jax.random.key(0), params, dj.AdapterConfig(method="vera", rank=16, targets=VERA_TARGETS))
    layer = adapted.base_model.model.model.layers[0].self_attn.v_proj
    np.testing.assert_array_equal(
        layer.vera_lambda_d["default"].detach().numpy(), ours["layers_0"]["self_attn"]["v_proj"]["kernel"]["lambda_d"]
    )
    assert not layer.vera_lambda_b["default"].detach().numpy().any()
    for name, shared in (("vera_A", "shared_a"), ("vera_B", "shared_b")):  # same shapes (transposed) and bounds
        theirs = getattr(adapted.base_model, name)["default"].numpy()
        mine = np.asarray(ours["vera_projection"][shared])
        assert theirs.shape == mine.T.shape
        bound = np.sqrt(6.0 / (theirs.shape[1] if name == "vera_A" else 16))
        assert 0.9 * bound < np.abs(theirs).max() <= bound and 0.9 * bound < np.abs(mine).max() <= bound
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in adapted.named_parameters():
            if "vera_lambda" in parameter_name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    adapted.eval().save_pretrained(tmp_path / "adapter")
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert cfg.method == "vera" and cfg.projection_seed == 7
    ids, mask = token_batch(LLAMA["vocab_size"], seq=10, padded=3)
    mine = assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)


def test_vera_adapter_saved_without_its_projections_is_refused(tmp_path):
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    config = peft.VeraConfig(r=16, target_modules=VERA_MODULES, save_projection=False)
    peft.get_peft_model(reference, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(dj.ConfigError, match=r"without its projections .*save_projection=True"):
        io.import_peft(tmp_path / "adapter", params, model=model)


def test_dvora_has_no_peft_format_and_says_to_merge(tmp_path):
    model = dj.models.from_hf_config(dict(model_type="llama", **LLAMA))
    params = dj.models.init_params(model, jax.random.key(0))
    cfg = dj.AdapterConfig(method="dvora", rank=4, targets=VERA_TARGETS)
    with pytest.raises(dj.ConfigError, match=r"PEFT has no DVoRA .*--format=merged"):
        io.export_peft(dj.init_adapters(jax.random.key(0), params, cfg), cfg, tmp_path, model=model)


# --- embedding tables --------------------------------------------------------------------------

EMBEDDINGS = {
    "llama": ("embed_tokens", r"(.*/)?(embed_tokens)/embedding"),
    "bert": ("word_embeddings", r".*/(word_embeddings)/embedding"),
}


def test_embedding_adapters_load_in_peft_and_import_back(tmp_path):
    # The new-token use case: DoRA on the Llama's embed_tokens table, next to q_proj.
    reference = hf_model(tmp_path / "base", "llama")
    model, params = io.load_hf(tmp_path / "base")
    cfg = dj.AdapterConfig(rank=4, alpha=8, targets=r"embed_tokens/embedding|.*/q_proj/kernel")
    ids, mask = token_batch(LLAMA["vocab_size"], seq=10, padded=3)
    adapters = trained_adapters(model, params, cfg, jnp.asarray(ids), jnp.asarray(mask))
    io.export_peft(adapters, cfg, tmp_path / "adapter", model=model)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, LLAMA["vocab_size"])
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    ours = assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.abs((ours - base)[mask.astype(bool)]).max() > 1e-3
    imported, _ = io.import_peft(tmp_path / "adapter", params, model=model)
    jax.tree.map(np.testing.assert_array_equal, imported, adapters)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_embedding_adapters_import_with_the_same_outputs(tmp_path, family):
    reference = hf_model(tmp_path / "base", family)
    module, target = EMBEDDINGS[family]
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=[module])
    adapted = peft.get_peft_model(reference, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    adapted.eval().save_pretrained(tmp_path / "adapter")  # PEFT saves the table itself beside the adapter
    model, params = io.load_hf(tmp_path / "base")
    adapters, cfg = io.import_peft(tmp_path / "adapter", params, model=model)
    assert cfg.targets == target
    ids, mask = token_batch(FAMILIES[family][2]["vocab_size"], seq=10, padded=3)
    assert_same_outputs(model, params, adapters, cfg, adapted, ids, mask)


def test_an_adapter_carrying_a_different_embedding_table_is_refused(tmp_path):
    reference = hf_model(tmp_path / "base", "llama")
    peft.get_peft_model(reference, peft.LoraConfig(r=4, target_modules=["embed_tokens"])).save_pretrained(
        tmp_path / "adapter"
    )
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0  # a retrained vocabulary
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    model, params = io.load_hf(tmp_path / "base")
    with pytest.raises(dj.ConfigError, match=r"embed_tokens.base_layer.weight' is an embedding table different"):
        io.import_peft(tmp_path / "adapter", params, model=model)
