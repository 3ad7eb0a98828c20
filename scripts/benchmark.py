"""Train-step cost of full fine-tuning, LoRA and DoRA, measured side by side in one process.

    python -m scripts.benchmark                         # MiniLM and Llama shapes, 16 x 128 tokens, r=16
    python -m scripts.benchmark --models minilm --steps 20 --json out.json
    python -m scripts.benchmark --device-count 8        # sharded (data parallel) on 8 forced host devices
    python -m scripts.benchmark --models minilm --peft  # with PyTorch PEFT's full / LoRA / DoRA steps (both shapes)
    python -m scripts.benchmark --models llama --llama-hidden 2048 --llama-layers 16 --llama-vocab 32000 \
        --dtype bfloat16 --batch 16 --seq 1024 --paths factored,folded --peak-tflops 989  # ~1B Llama, H200, MFU

For each model shape it compiles the training CLI's own train step (``optim.make_train_step`` with
the CLI's forward and optimizer: AdamW, schedule, clipping) per variant (full fine-tuning; LoRA;
DoRA with norm_grad exact and detach; DoRA split as the paper's Table 6, A and B on q, k, v and the
magnitude alone on the other layers; VeRA and DVoRA at the same r; QLoRA and QDoRA over an NF4 base
when asked for; ``--variants`` picks some) on the ``inject`` path with the factored and the folded
forward (``AdapterConfig.forward``) and on the ``merge`` path), then times the variants round-robin
(median of ``--steps`` timed steps after warm-up, ``block_until_ready``) so that machine noise hits
all of them alike. It prints ms/step, tokens/s, the ratios to LoRA on the same path (DoRA folded
against LoRA folded, ...) and to full fine-tuning, XLA's compiled FLOPs (``cost_analysis``) and peak
memory (``memory_analysis``: arguments + outputs + temporaries − aliased), then the same as JSON;
then how long the train step of a ``--compile-layers`` Llama takes to compile unrolled and with
``model.scan_layers`` (``scripts/compile_time.py``). Ratios are computed from this run's own
measurements. With ``--peak-tflops`` (the device's dense peak for the compute dtype) it adds the
model FLOPs and MFU: the step's FLOPs as written (XLA's count of the lowered HLO with XLA's
attention: every matmul once, no recomputation; a GPU's compiled count omits the cuBLAS and cuDNN
calls) per second over that peak.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="minilm,llama",
        help="comma list of minilm, llama and the inject_fn models nnx_mlp, jax_mlp (scripts/benchmark_fn.py)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--llama-hidden", type=int, default=512)
    parser.add_argument("--llama-layers", type=int, default=4)
    parser.add_argument("--llama-vocab", type=int, default=8192)
    parser.add_argument("--minilm-layers", type=int, default=6)
    parser.add_argument("--minilm-hidden", type=int, default=384)
    parser.add_argument("--paths", default="factored,folded,merge", help="comma list of factored, folded, merge")
    parser.add_argument(
        "--variants",
        default="",
        help="comma list of VARIANTS names (default: all but the quantized qlora, qdora); full and lora always run",
    )
    parser.add_argument("--device-count", type=int, default=0, help="forced host devices (data parallel)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument(
        "--peak-tflops",
        default="0",
        help="device peak TFLOP/s for the compute dtype: adds MFU; 'auto': the bfloat16 peak of a known device",
    )
    parser.add_argument("--markdown", default="", help="also write the table (markdown) to this file")
    parser.add_argument(
        "--peft", action="store_true", help="also time PyTorch PEFT (full, LoRA, DoRA) on the same shapes, same loop"
    )
    parser.add_argument(
        "--compile-layers",
        type=int,
        default=32,
        help="also time the train step's compilation for a Llama of this many layers, unrolled and scanned (0: skip)",
    )
    parser.add_argument("--compile-hidden", type=int, default=256, help="hidden size of that Llama")
    parser.add_argument("--compile-repeats", type=int, default=2, help="measurements of each layout (the fastest)")
    parser.add_argument(
        "--attention", default="auto", help="the Llama shape's model.attention: auto, recompute, xla or cudnn"
    )
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device_count:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.device_count} " + os.environ.get(
        "XLA_FLAGS", ""
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import dora_jax as dj  # noqa: E402
from dora_jax import io, metrics, models, optim, run_config, runs  # noqa: E402
from dora_jax.models.layers import resolve_attention  # noqa: E402
from scripts import benchmark_fn, compile_time  # noqa: E402
from scripts.compare_paths import compiled_cost  # noqa: E402

VARIANTS = (  # name, method, norm_grad, placement: every linear layer, or the paper's magnitude-only split
    ("full", None, None, "all"),
    ("lora", "lora", "detach", "all"),
    ("dora_exact", "dora", "exact", "all"),
    ("dora_detach", "dora", "detach", "all"),
    ("dora_magnitude", "dora", "detach", "magnitude"),
    ("vera", "vera", "detach", "all"),
    ("dvora", "dvora", "detach", "all"),
    ("qlora", "lora", "detach", "all"),
    ("qdora", "dora", "exact", "all"),
)
# Variants over a quantized base (model.quantize: every linear kernel but the head's, bitsandbytes' NF4 in
# blocks of 64): run only when --variants names them; "vs LoRA" is then the dequantization's cost.
QUANTIZED = {"qlora": "nf4", "qdora": "nf4"}


def model_shapes(args) -> dict:
    """HF config dicts of the benchmarked shapes."""
    shapes = {
        "minilm": dict(
            model_type="bert",
            vocab_size=30522,
            hidden_size=args.minilm_hidden,
            num_hidden_layers=args.minilm_layers,
            num_attention_heads=12,
            intermediate_size=4 * args.minilm_hidden,
            max_position_embeddings=512,
        ),
        "llama": dict(
            model_type="llama",
            vocab_size=args.llama_vocab,
            hidden_size=args.llama_hidden,
            intermediate_size=int(2.6875 * args.llama_hidden) // 64 * 64,
            num_hidden_layers=args.llama_layers,
            num_attention_heads=max(args.llama_hidden // 64, 1),
            num_key_value_heads=max(args.llama_hidden // 256, 1),
            max_position_embeddings=4096,
        ),
    }
    names = args.models.split(",")
    unknown = sorted(set(names) - set(shapes) - set(benchmark_fn.MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {[*shapes, *benchmark_fn.MODELS]}")
    return {name: shapes[name] for name in names if name in shapes}


TARGETS = {
    "minilm": r"encoder/.*/kernel",  # every linear layer of the encoder (PEFT's all-linear)
    "llama": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
}
# The paper's Table 6 split of the same layers: A, B on the attention's q, k, v; m alone on the others.
MAGNITUDE_SPLIT = {
    "minilm": (r".*/attention/(query|key|value)/kernel", r"encoder/.*/(output|intermediate)/dense/kernel"),
    "llama": (r".*/(q_proj|k_proj|v_proj)/kernel", r".*/(o_proj|gate_proj|up_proj|down_proj)/kernel"),
}


def batch_of(model, ids, target=None) -> dict:
    """The timed batch: next-token targets for Llama (the last position scores nothing); for MiniLM
    the squared error of its hidden states to a fixed random target (``regression_target``)."""
    if models.family(model).output == "hidden":  # after the last LayerNorm mean(out**2) is ~1 for any weights
        return {"inputs": ids, "targets": target, "loss_mask": jnp.ones(ids.shape, jnp.float32)}
    mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
    return {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1), "loss_mask": mask}


def metrics_of(model):
    return metrics.squared_error if models.family(model).output == "hidden" else metrics.lm_metrics


def optimizer(trainable) -> optax.GradientTransformation:
    """The CLI's optimizer (``optim.make_optimizer`` of the default run: AdamW, warmup, cosine,
    clipping, decay mask) at a small learning rate."""
    train = run_config.defaults().train
    train.learning_rate = 1e-4
    return optim.make_optimizer(train, trainable)


def variant_step(model, params, name, method, norm_grad, path, rank, placement="all"):
    """(step_for, state, frozen) of one variant: ``step_for(model)`` jits the CLI's train step
    (``runs.make_forward``, its optimizer) over ``model`` (the timed one, or the same shapes with XLA's
    attention for the model FLOPs); the merge path builds W' = merge(...) in the forward instead."""
    if method is None:
        cfg = None
        mask = jax.tree.map(lambda _: True, params)
        trained, frozen = dj.partition(jax.tree.map(jnp.copy, params), mask)  # donated by the step
        trainable = {"adapters": None, "params": trained}
    else:
        arch = "minilm" if models.family(model).output == "hidden" else "llama"
        targets, magnitude_targets = (TARGETS[arch], "") if placement == "all" else MAGNITUDE_SPLIT[arch]
        cfg = dj.AdapterConfig(
            method=method,
            rank=rank,
            alpha=2.0 * rank,
            targets=targets,
            magnitude_targets=magnitude_targets,
            norm_grad=norm_grad,
        )
        cfg = dataclasses.replace(cfg, forward="factored" if path == "merge" else path, fallback="error")
        adapters = dj.init_adapters(jax.random.key(1), params, cfg)
        adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # B (VeRA: lambda_b) != 0: a trained adapter
        trained, frozen = dj.partition(params, dj.trainable_mask(params))
        trainable = {"adapters": adapters, "params": trained}
    tx = optimizer(trainable)

    def step_for(model):
        forward = runs.make_forward(model, cfg)
        if path == "merge" and cfg is not None:

            def forward(trainable, frozen, batch, rng):
                merged = dj.merge(dj.combine(trainable["params"], frozen), trainable["adapters"], cfg)
                return model.apply({"params": merged}, batch["inputs"])

        return jax.jit(optim.make_train_step(forward, tx, metrics_of(model)), donate_argnums=(0,))

    return step_for, optim.init_state(tx, trainable), frozen


def model_gflop(step, args_) -> float | None:
    """The step's FLOPs as written: XLA's count of the lowered (not yet optimized) HLO, every matmul
    once (the benchmark's steps have no remat; counted with XLA's attention, not the recomputing
    kernel) and nothing hidden in library calls, which a GPU's compiled count omits (cuBLAS matmuls,
    cuDNN attention). MFU's numerator. None where the backend has no cost analysis of lowered HLO
    (a GPU under JAX 0.11): the same step lowered on a CPU gives the count (docs/performance.md)."""
    cost = step.lower(*args_).cost_analysis()
    return None if cost is None else cost["flops"] / 1e9


def compiled_figures(step, args_) -> dict:
    """The compiled step's FLOPs and peak memory. The jitted step's first call finds this compilation in
    the persistent compilation cache (``main`` sets one up) rather than compiling it again."""
    compiled = step.lower(*args_).compile()
    cost = compiled_cost(compiled)
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {
        "gflop": cost["flops"] / 1e9,
        "peak_mib": peak / 2**20,
        "temp_mib": cost["temp_bytes"] / 2**20,
    }


def benchmark_model(name: str, hf_config: dict, args) -> list[dict]:
    llama = {"attention": args.attention} if name == "llama" else {}  # model.attention: the Llama family's
    model = models.from_hf_config(hf_config, dtype=jnp.dtype(args.dtype), **llama)
    flops_model = models.from_hf_config(hf_config, dtype=jnp.dtype(args.dtype), **(llama and {"attention": "xla"}))
    peak = peak_tflops(args.peak_tflops)
    params = models.init_params(model, jax.random.key(0))
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, replicated)
    ids = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 3, hf_config["vocab_size"])
    target = None
    if models.family(model).output == "hidden":
        target = regression_target(args.batch, args.seq, hf_config["hidden_size"])
    batch = jax.device_put(batch_of(model, ids, target), split)
    runs, quantized = {}, {}
    every = {v[0] for v in VARIANTS if v[0] not in QUANTIZED}
    wanted = set(args.variants.split(",")) | {"full", "lora"} if args.variants else every
    unknown = wanted - {v[0] for v in VARIANTS}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    for variant, method, norm_grad, placement in VARIANTS:
        if variant not in wanted:
            continue
        for path in ["factored"] if method is None else args.paths.split(","):
            key = variant if method is None else f"{variant}/{path}"
            if variant in QUANTIZED and QUANTIZED[variant] not in quantized:
                quantized[QUANTIZED[variant]] = io.quantize_base(model, params, QUANTIZED[variant])
            base = quantized[QUANTIZED[variant]] if variant in QUANTIZED else params
            built = variant_step(model, base, variant, method, norm_grad, path, args.rank, placement)
            step_for, state, frozen = built
            state = jax.device_put(state, replicated)
            step, step_args = step_for(model), (state, frozen, batch, jax.random.key(0))
            started = time.perf_counter()
            figures = compiled_figures(step, step_args)
            if peak:  # MFU: the model's FLOPs, counted on the step with XLA's attention (no cuDNN call)
                figures["model_gflop"] = model_gflop(step_for(flops_model), step_args)
            print(f"{name} {key}: compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            run = {"step": step, "state": state, "frozen": frozen, "figures": figures, "times": []}
            run["advance"] = lambda run=run: _advance(run, batch)
            runs[key] = run
    if args.peft:
        runs.update(peft_runs(name, hf_config, ids, target, args))
    for _ in range(args.warmup):
        for run in runs.values():
            run["advance"]()
    for _ in range(args.steps):  # round-robin: noise hits every variant alike
        for run in runs.values():
            start = time.perf_counter()
            loss = run["advance"]()
            run["times"].append(time.perf_counter() - start)
            run["loss"] = float(loss)  # after the clock: a finite loss shows the step trains something
    rows = []
    medians = {key: float(np.median(run["times"])) for key, run in runs.items()}
    first_path = args.paths.split(",")[0]
    for key, run in runs.items():
        torch_side = key.endswith("/torch")  # PEFT rows: ratios to PEFT's own LoRA and full fine-tuning
        # Adapter rows: ratios to LoRA on the same path; full fine-tuning: to LoRA on the first path.
        lora = "peft_lora/torch" if torch_side else f"lora/{key.partition('/')[2] or first_path}"
        ms = 1e3 * medians[key]
        figures = run["figures"]
        rows.append(
            {
                "model": name,
                "variant": key,
                "ms_per_step": ms,
                "loss": run["loss"],
                "tokens_per_s": args.batch * args.seq / medians[key],
                "vs_lora": medians[key] / medians[lora],
                "vs_full": medians[key] / medians["peft_full/torch" if torch_side else "full"],
                "peak_vs_lora": figures["peak_mib"] / runs[lora]["figures"]["peak_mib"] if figures else None,
                "gflop": figures.get("gflop"),
                "peak_mib": figures.get("peak_mib"),
                "model_gflop": figures.get("model_gflop"),
                "mfu": mfu(figures.get("model_gflop"), medians[key], peak),
                "temp_mib": figures.get("temp_mib"),
                "devices": len(devices),
            }
        )
    return rows


def regression_target(batch: int, seq: int, hidden: int) -> np.ndarray:
    """The MiniLM rows' fixed regression target (standard normal, seed 3), shared with the PyTorch rows."""
    return np.random.default_rng(3).standard_normal((batch, seq, hidden), dtype=np.float32)


def peft_runs(name: str, hf_config: dict, ids, target: np.ndarray | None, args) -> dict:
    """PyTorch steps of the same shape and loss: full fine-tuning, PEFT LoRA and PEFT DoRA (AdamW, eager;
    on the GPU when torch sees one, under bfloat16 autocast when ``--dtype bfloat16``)."""
    import peft
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.tensor(np.asarray(ids), dtype=torch.long, device=device)
    if name == "minilm":
        config = transformers.BertConfig(**hf_config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        build, modules = transformers.BertModel, r".*encoder.*\.(query|key|value|dense)"  # every encoder linear
        goal = torch.from_numpy(target).to(device)

        def loss_of(model):
            return (model(input_ids=tokens).last_hidden_state.float() - goal).pow(2).mean()
    else:
        config = transformers.LlamaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
        build, modules = transformers.LlamaForCausalLM, r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

        def loss_of(model):  # next token; the last position scores nothing (as ``batch_of``)
            logits = model(input_ids=tokens).logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    runs = {}
    for variant in ("full", "lora", "dora"):
        torch.manual_seed(0)
        model = build(config)
        if variant != "full":
            lora = peft.LoraConfig(
                r=args.rank,
                lora_alpha=2 * args.rank,
                target_modules=modules,
                use_dora=variant == "dora",
                lora_dropout=0.0,
            )
            model = peft.get_peft_model(model, lora)
            for key, p in model.named_parameters():  # B != 0: a trained adapter, as for the JAX variants
                if "lora_B" in key:
                    torch.nn.init.constant_(p, 0.01)
        model.to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def advance(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                loss = loss_of(model)
            loss.backward()
            optimizer.step()
            return loss.item()  # waits for the device

        runs[f"peft_{variant}/torch"] = {"advance": advance, "figures": {}, "times": []}
    return runs


def _advance(run, batch):
    run["state"], out = run["step"](run["state"], run["frozen"], batch, jax.random.key(0))
    return jax.block_until_ready(out["loss"])


# Dense bfloat16 peak TFLOP/s per device, by a substring of jax's device_kind (vendor data sheets).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6", 918.0),
)


def peak_tflops(value: str) -> float:
    """``--peak-tflops``: a number, or 'auto' (the device's bfloat16 peak; 0, no MFU, for an unknown device)."""
    if value != "auto":
        return float(value)
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in kind), 0.0)


def mfu(gflop: float | None, seconds: float, peak_tflops: float) -> float | None:
    """Model FLOPs (``model_gflop``) per second of a step over the device peak; None without a peak or FLOPs."""
    if not peak_tflops or not gflop:
        return None
    return gflop * 1e9 / seconds / (peak_tflops * 1e12)


def table(rows: list[dict]) -> str:
    with_mfu = any(r.get("mfu") is not None for r in rows)
    head = "| model | variant | ms/step | tokens/s | vs LoRA | vs full FT | GFLOP | peak MiB | peak vs LoRA |"
    head += " model GFLOP | MFU |" if with_mfu else ""  # GFLOP: compiled (CPU: what runs); model: as written
    lines = [head, "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_mfu else "")]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['vs_lora']:.2f} | {r['vs_full']:.2f} | {fmt(r['gflop'], '.1f')} | {fmt(r['peak_mib'], '.0f')} | "
            f"{fmt(r['peak_vs_lora'], '.2f')} |"
            + (f" {fmt(r['model_gflop'], '.1f')} | {fmt(r['mfu'], '.1%')} |" if with_mfu else "")
        )
    return "\n".join(lines)


def compilation_cache() -> None:
    """A persistent compilation cache for this process, unless one is configured: each step is compiled
    for its figures (``compiled_figures``), and the jitted step's first call then reads it from there."""
    if jax.config.jax_compilation_cache_dir is None:
        directory = tempfile.mkdtemp(prefix="dora_jax_benchmark_xla_cache_")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(args) -> list[dict]:
    compilation_cache()
    rows = []
    for name, hf_config in model_shapes(args).items():
        rows += benchmark_model(name, hf_config, args)
    rows += benchmark_fn.rows(args, compiled_figures)  # the inject_fn models named in --models
    attention = resolve_attention(args.attention, args.dtype, args.llama_hidden // max(1, args.llama_hidden // 64))
    heading = (
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; batch {args.batch} x {args.seq} tokens; "
        f"r={args.rank}; compute {args.dtype}; peak {peak_tflops(args.peak_tflops) or '–'} TFLOP/s; "
        f"Llama attention {attention}"
    )
    print(heading)
    print(table(rows))
    print(json.dumps(rows))
    compiled, extra = "", []
    if args.compile_layers:  # scan_layers: one layer compiled instead of every layer
        figures = compile_time.compare(
            args.compile_layers, args.compile_hidden, rank=args.rank, seq=args.seq, repeats=args.compile_repeats
        )
        compiled, extra = compile_time.table(figures), [{"model": "compile_time", **figures}]
        print(compiled)
        print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows + extra, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{heading}\n\n{table(rows)}\n" + (f"\n{compiled}\n" if compiled else ""))
    return rows


if __name__ == "__main__":
    sys.exit(main(ARGS) and 0)
