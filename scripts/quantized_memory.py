"""What a quantized base saves: compiled argument bytes of a model's frozen weights, none / int8 / nf4.

    python -m scripts.quantized_memory configs/hf/llama-3-8b/config.json     # Llama-3-8B, bfloat16
    python -m scripts.quantized_memory configs/hf/llama-7b/config.json --json
    python -m scripts.quantized_memory --loader /tmp/ckpt    # load_hf's peak memory on a 1.4 GiB checkpoint

From the model's ``config.json`` alone (shapes, no weights): the base params in ``--dtype``, and the
same with every linear kernel but the head's quantized as ``model.quantize`` stores them
(``io.quantize_base``: NF4 in blocks of 64 inputs, int8 per output column, bitsandbytes' defaults),
each compiled as the argument of a program (XLA's ``memory_analysis()``: stable, exact on any
backend). Prints the linear kernels' bytes and the whole model's per scheme, and their ratio to the
unquantized model.

``--loader DIR`` writes a random float32 Llama of 1.4 GiB to DIR (once) and loads it with ``load_hf``
in a fresh process per scheme, printing the process's peak resident memory (``ru_maxrss``) beside the
loaded params' bytes and an empty process's: a quantizing load reads and quantizes tensor by tensor,
so the checkpoint is never resident at full precision as a whole.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
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


# The --loader checkpoint: 24 layers of width 1024, 32k vocabulary, float32: 374M params, 1.39 GiB.
LOADER_MODEL = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)  # fmt: skip


def make_checkpoint(directory: pathlib.Path, hf_config: dict = LOADER_MODEL) -> int:
    """A random float32 model of ``hf_config`` saved as an HF directory (kept if present); its bytes."""
    if not (directory / "config.json").exists():
        model = models.from_hf_config(hf_config)
        io.save_hf(model, models.init_params(model, jax.random.key(0)), directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def peak_of_load(directory: str, scheme: str) -> dict[str, float]:
    """In this process: load ``directory`` with ``quantize=scheme``; peak resident and params bytes."""
    jnp.zeros(()).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = io.load_hf(directory, quantize=scheme)[1] if scheme != "empty" else {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"scheme": scheme, "peak_rss_bytes": peak, "start_rss_bytes": before, "params_bytes": argument_bytes(params)}


def loader_figures(directory: pathlib.Path, hf_config: dict = LOADER_MODEL) -> list[dict[str, float]]:
    """``peak_of_load`` per scheme, each in a fresh process (ru_maxrss never goes down)."""
    checkpoint = make_checkpoint(directory, hf_config)
    rows = []
    for scheme in SCHEMES:
        command = [sys.executable, "-m", "scripts.quantized_memory", "--measure-load", str(directory), scheme]
        root = pathlib.Path(__file__).resolve().parents[1]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root).stdout
        rows.append({**json.loads(out.splitlines()[-1]), "checkpoint_bytes": checkpoint})
    return rows


def loader_table(rows: list[dict[str, float]]) -> str:
    gib = 2**30
    lines = [
        f"checkpoint: {rows[0]['checkpoint_bytes'] / gib:.2f} GiB (float32); a process with JAX started: "
        f"{rows[0]['start_rss_bytes'] / gib:.2f} GiB resident",
        "| load_hf(quantize=) | params GiB | peak resident GiB | peak - start GiB |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['params_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
            f"{(r['peak_rss_bytes'] - r['start_rss_bytes']) / gib:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config_json", nargs="?", help="an HF config.json (Llama or BERT family)")
    parser.add_argument("--dtype", default="bfloat16", help="the unquantized params' dtype")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--loader", help="measure load_hf's peak memory on a 1.4 GiB checkpoint kept in this directory")
    parser.add_argument("--measure-load", nargs=2, metavar=("DIR", "SCHEME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_load:
        result = peak_of_load(*args.measure_load)
        print(json.dumps(result))
        return result
    if args.loader:
        rows = loader_figures(pathlib.Path(args.loader))
        print(json.dumps(rows) if args.json else loader_table(rows))
        return {"loader": rows}
    if not args.config_json:
        parser.error("give a config.json, or --loader DIR")
    with open(args.config_json) as f:
        result = figures(json.load(f), args.dtype)
    print(json.dumps(result) if args.json else table(result, args.dtype))
    return result


if __name__ == "__main__":
    main()
