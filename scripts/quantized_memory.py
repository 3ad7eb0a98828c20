"""What a quantized base saves: compiled argument bytes of a model's frozen weights, none / int8 / nf4.

    python -m scripts.quantized_memory configs/hf/llama-3-8b/config.json     # Llama-3-8B, bfloat16
    python -m scripts.quantized_memory configs/hf/llama-7b/config.json --json

From the model's ``config.json`` alone (shapes, no weights): the base params in ``--dtype``, and the
same with every linear kernel but the head's quantized as ``model.quantize`` stores them
(``io.quantize_base``: NF4 in blocks of 64 inputs, int8 per output column, bitsandbytes' defaults),
each compiled as the argument of a program (XLA's ``memory_analysis()``: stable, exact on any
backend). Prints the linear kernels' bytes and the whole model's per scheme, and their ratio to the
unquantized model.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jax
import jax.numpy as jnp

from dora_jax import io, models, targets

SCHEMES = ("none", "int8", "nf4")


def argument_bytes(tree: Any) -> int:
    """Bytes XLA allocates for ``tree`` as a program's argument (``uint4`` codes two to a byte)."""
    return jax.jit(lambda _: 0, keep_unused=True).lower(tree).compile().memory_analysis().argument_size_in_bytes


def figures(hf_config: dict, dtype: str = "bfloat16") -> dict[str, dict[str, float]]:
    """{scheme: {kernel_bytes, model_bytes, kernel_ratio, model_ratio}} of the model ``hf_config`` names."""
    model = models.from_hf_config(hf_config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), models.abstract_params(model))
    out: dict[str, dict[str, float]] = {}
    for scheme in SCHEMES:
        tree = jax.eval_shape(lambda p, scheme=scheme: io.quantize_base(model, p, scheme), params)
        kernels = {p: leaf for p, leaf in targets.leaves_by_path(tree).items() if models.is_base_kernel(model, p)}
        out[scheme] = {"kernel_bytes": argument_bytes(kernels), "model_bytes": argument_bytes(tree)}
    for scheme in SCHEMES:
        out[scheme]["kernel_ratio"] = out[scheme]["kernel_bytes"] / out["none"]["kernel_bytes"]
        out[scheme]["model_ratio"] = out[scheme]["model_bytes"] / out["none"]["model_bytes"]
    return out


def table(result: dict[str, dict[str, float]], dtype: str) -> str:
    rows = [
        f"| base | linear kernels GiB | vs {dtype} | whole model GiB | vs {dtype} |",
        "|---|---:|---:|---:|---:|",
    ]
    for scheme, f in result.items():
        rows.append(
            f"| {scheme if scheme != 'none' else dtype} | {f['kernel_bytes'] / 2**30:.2f} | {f['kernel_ratio']:.3f} | "
            f"{f['model_bytes'] / 2**30:.2f} | {f['model_ratio']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config_json", help="an HF config.json (Llama or BERT family)")
    parser.add_argument("--dtype", default="bfloat16", help="the unquantized params' dtype")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    with open(args.config_json) as f:
        result = figures(json.load(f), args.dtype)
    print(json.dumps(result) if args.json else table(result, args.dtype))
    return result


if __name__ == "__main__":
    main()
