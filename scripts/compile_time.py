"""How long the train step takes to compile with the decoder layers unrolled and scanned.

    python -m scripts.compile_time                      # 32 layers, hidden 256, DoRA r=16
    python -m scripts.compile_time --layers 80 --hidden 512 --method lora

The step is the one ``dora_jax.train`` runs (``scripts.memory_plan.abstract_step``: the same model,
adapters, optimizer and shardings, on shapes alone) for a random Llama of ``--layers`` layers, once
with ``model.scan_layers=False`` (every layer traced and compiled on its own) and once with ``True``
(one ``nn.scan``: the layer is traced and compiled once). Trace-and-lower and XLA compile seconds are
timed separately, the two layouts alternating ``--repeats`` times (the fastest of each is reported),
with JAX's persistent compilation cache off so that every compile is a real one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import jax

from dora_jax import run_config
from scripts.memory_plan import abstract_step


def config_for(layers: int, hidden: int, scan: bool, method: str = "dora", rank: int = 16, seq: int = 128) -> Any:
    """The default config over a random Llama of ``layers`` layers of width ``hidden``, batch 8 x ``seq``."""
    config = run_config.defaults()
    config.model.hf_dir = "random"
    config.model.scan_layers = scan
    config.model.base.architecture.update(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=1024,
        max_position_embeddings=max(seq, 64),
    )
    if method == "full":
        config.train.finetune = "full"
    else:
        config.adapter.update(method=method, rank=rank)
    config.data.length = seq
    config.train.batch_size = 8
    return config


@contextlib.contextmanager
def no_persistent_cache():
    """JAX's persistent compilation cache off (a cached program would not be compiled at all)."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def time_compile(config: Any) -> dict[str, float]:
    """Seconds to build, trace and lower the step (``lower_s``) and to compile it (``compile_s``)."""
    start = time.perf_counter()
    step, arguments, _, _ = abstract_step(config)
    lowered = step.lower(*arguments)
    lowered_at = time.perf_counter()
    with no_persistent_cache():
        lowered.compile()
    return {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}


def compare(layers: int, hidden: int, method: str = "dora", rank: int = 16, seq: int = 128, repeats: int = 2) -> dict:
    """The fastest of ``repeats`` alternating measurements of each layout, and scanned / unrolled ratios."""
    best: dict[bool, dict[str, float]] = {}
    for _ in range(repeats):
        for scan in (False, True):
            figures = time_compile(config_for(layers, hidden, scan, method, rank, seq))
            best[scan] = {k: min(v, best.get(scan, figures)[k]) for k, v in figures.items()}
    out = {"layers": layers, "hidden": hidden, "method": method, "rank": rank, "seq": seq, "repeats": repeats}
    for scan, name in ((False, "unrolled"), (True, "scanned")):
        out |= {f"{name}_{k}": v for k, v in best[scan].items()}
    for key in ("lower_s", "compile_s"):
        out[f"ratio_{key}"] = out[f"scanned_{key}"] / out[f"unrolled_{key}"]
    total = {name: out[f"{name}_lower_s"] + out[f"{name}_compile_s"] for name in ("unrolled", "scanned")}
    out["ratio_total"] = total["scanned"] / total["unrolled"]
    return out


def table(figures: dict) -> str:
    head = (
        f"train step compile time, {figures['layers']} layers x hidden {figures['hidden']}, {figures['method']} "
        f"r={figures['rank']}, batch 8 x {figures['seq']} (fastest of {figures['repeats']}):"
    )
    rows = ["| layers | trace + lower (s) | compile (s) | total (s) |", "|---|---:|---:|---:|"]
    for name in ("unrolled", "scanned"):
        lower, compile_ = figures[f"{name}_lower_s"], figures[f"{name}_compile_s"]
        rows.append(f"| {name} | {lower:.2f} | {compile_:.2f} | {lower + compile_:.2f} |")
    rows.append(
        f"| scanned / unrolled | {figures['ratio_lower_s']:.2f} | {figures['ratio_compile_s']:.2f} | "
        f"{figures['ratio_total']:.2f} |"
    )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--method", default="dora", help="dora, lora, ... or full")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    figures = compare(args.layers, args.hidden, args.method, args.rank, args.seq, args.repeats)
    print(table(figures))
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}\n\n{table(figures)}\n")
    return figures


if __name__ == "__main__":
    main()
