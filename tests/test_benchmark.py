"""scripts/benchmark.py runs end to end on a tiny size, and its ratios come from its own measurements."""

import numpy as np
import pytest

from scripts import benchmark

TINY = ["--batch", "2", "--seq", "16", "--rank", "2", "--steps", "2", "--warmup", "1"]
TINY += ["--minilm-layers", "1", "--minilm-hidden", "48", "--llama-hidden", "64", "--llama-layers", "1"]
TINY += ["--llama-vocab", "128", "--compile-layers", "0"]  # compile times: the device check's test below


CORE = ("lora", "dora_exact")  # the variants the Llama shape runs (QDoRA: the device check's); MiniLM: the rest


@pytest.fixture(scope="module")
def rows():
    """Every path and variant once: the Llama shape merged (LoRA and DoRA; factored and folded: the device
    check below), the MiniLM shape folded with every variant, PEFT's rows beside it; MFU (a second lowering
    of each step, for its model FLOPs) on the Llama shape."""
    variants = ["--variants", ",".join(CORE), "--peak-tflops", "0.5"]
    llama = benchmark.main(benchmark.parse_args([*TINY, "--models", "llama", "--paths", "merge", *variants]))
    minilm = benchmark.main(benchmark.parse_args([*TINY, "--models", "minilm", "--paths", "folded", "--peft"]))
    return llama + minilm


FIRST_PATH = {"llama": "merge", "minilm": "folded"}  # the --paths each shape runs (first given)


def expected_variants(paths, variants):
    return {"full"} | {f"{v}/{p}" for v in variants for p in paths}


def test_every_variant_of_every_model_is_measured(rows):
    variants = {(r["model"], r["variant"]) for r in rows}
    llama = {("llama", v) for v in expected_variants(("merge",), CORE)}
    every = [v[0] for v in benchmark.VARIANTS[1:] if v[0] not in benchmark.QUANTIZED]  # qlora, qdora: on request
    minilm = {("minilm", v) for v in expected_variants(("folded",), every)}
    peft = {("minilm", f"peft_{v}/torch") for v in ("full", "lora", "dora")}  # the fixture asks --peft for MiniLM
    assert variants == llama | minilm | peft
    jax_rows = [r for r in rows if not r["variant"].endswith("/torch")]
    assert all(r["ms_per_step"] > 0 and r["gflop"] > 0 and r["peak_mib"] > 0 for r in jax_rows)


def test_ratios_are_computed_from_the_runs_own_times(rows):
    for model in ("minilm", "llama"):
        by = {r["variant"]: r for r in rows if r["model"] == model}
        for r in by.values():
            torch_side = r["variant"].endswith("/torch")
            path = r["variant"].partition("/")[2] or FIRST_PATH[model]  # LoRA on the same path; full FT: the first
            lora, full = ("peft_lora/torch", "peft_full/torch") if torch_side else (f"lora/{path}", "full")
            assert r["vs_lora"] == pytest.approx(r["ms_per_step"] / by[lora]["ms_per_step"])
            assert r["vs_full"] == pytest.approx(r["ms_per_step"] / by[full]["ms_per_step"])
            assert r["tokens_per_s"] == pytest.approx(2 * 16 * 1000 / r["ms_per_step"])
            if not torch_side:
                assert r["peak_vs_lora"] == pytest.approx(r["peak_mib"] / by[lora]["peak_mib"])
            if model == "llama":  # MFU: the model FLOPs per second of this run's own median step over --peak-tflops
                assert r["mfu"] == pytest.approx(r["model_gflop"] * 1e9 / (r["ms_per_step"] / 1e3) / 0.5e12)
            else:  # no --peak-tflops: no MFU, and no second lowering for the model FLOPs
                assert r["mfu"] is None and r["model_gflop"] is None


def test_model_flops_count_each_matmul_once_as_written():
    import jax
    import jax.numpy as jnp

    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert benchmark.model_gflop(jax.jit(lambda x, w: x @ w), (x, w)) * 1e9 == 2 * 8 * 16 * 4


def test_full_fine_tuning_has_more_model_flops_than_an_adapter_step(rows):
    by = {r["variant"]: r for r in rows if r["model"] == "llama"}  # the weight gradients LoRA does not take
    assert by["full"]["model_gflop"] > by["lora/merge"]["model_gflop"]


def test_data_throughput_counts_the_batches_it_builds():
    from dora_jax import run_config
    from scripts import data_throughput

    config = run_config.defaults()
    figures = data_throughput.throughput(config, batches=20)
    assert figures["tokens_per_s"] == pytest.approx(figures["batches_per_s"] * config.train.batch_size * 17)


def test_every_variant_trains_on_a_finite_loss(rows):
    # MiniLM regresses its hidden states to a fixed target (as the PEFT rows do), Llama predicts the next token:
    # a NaN here would mean the timed step differentiates a loss that teaches nothing.
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)


def test_the_minilm_loss_has_a_gradient():
    # The hidden states leave a LayerNorm: mean(out**2) is ~1 for any weights and its gradient ~0, so
    # the timed step would train nothing. The regression to a fixed target must not be flat.
    import jax
    import optax

    from dora_jax import models, runs

    args = benchmark.parse_args(["--models", "minilm", "--minilm-layers", "1", "--minilm-hidden", "48"])
    model = models.from_hf_config(benchmark.model_shapes(args)["minilm"])
    params = models.init_params(model, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 3, 1000)
    batch = benchmark.batch_of(model, ids, benchmark.regression_target(2, 16, 48))
    forward = runs.make_forward(model, None)

    def loss(params):
        frozen = jax.tree.map(lambda _: None, params)  # full fine-tuning: nothing frozen
        return benchmark.metrics_of(model)(forward({"adapters": None, "params": params}, frozen, batch, None), batch)

    grads = jax.jit(jax.grad(lambda p: loss(p)["loss_sum"]))(params)
    kernels = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if "kernel" in jax.tree_util.keystr(path)]
    assert optax.tree.norm(kernels) > 1e-2  # what the adapters learn from; the LayerNorm scales learn anyway


def test_the_device_check_runs_end_to_end_on_a_tiny_cpu_shape(tmp_path):
    """scripts/device_check.sh as a lent GPU runs it, on the tiny shape: every row, JSON and markdown."""
    import json
    import os

    from conftest import run_command

    run_command(["bash", "scripts/device_check.sh", str(tmp_path)], env=dict(os.environ, DEVICE_CHECK_SHAPE="tiny"))
    compiled = json.loads((tmp_path / "compile_time.json").read_text())  # 2 layers unrolled and scanned
    assert compiled["layers"] == 2 and compiled["ratio_total"] == pytest.approx(
        (compiled["scanned_lower_s"] + compiled["scanned_compile_s"])
        / (compiled["unrolled_lower_s"] + compiled["unrolled_compile_s"])
    )
    assert "| scanned / unrolled |" in (tmp_path / "compile_time.md").read_text()
    rows = json.loads((tmp_path / "device_check.json").read_text())
    jax_side = {"full", "lora/factored", "qdora/factored"}  # tiny: QDoRA beside LoRA, the factored path
    assert {r["variant"] for r in rows} == jax_side | {f"peft_{v}/torch" for v in ("full", "lora", "dora")}
    assert all(r["model"] == "llama" and np.isfinite(r["loss"]) for r in rows)
    assert all(r["mfu"] is None for r in rows)  # a CPU has no known bfloat16 peak
    markdown = (tmp_path / "device_check.md").read_text()
    assert markdown.startswith("devices: 1 x cpu") and "| llama | peft_dora/torch |" in markdown
    assert "Llama attention recompute" in markdown  # auto on CPU
    xla = json.loads((tmp_path / "attention_xla.json").read_text())
    assert {r["variant"] for r in xla} == {"full", "lora/factored", "dora_exact/factored"}
    assert "Llama attention xla" in (tmp_path / "attention_xla.md").read_text()
    (plan,) = [json.loads(line) for line in (tmp_path / "memory_plan.jsonl").read_text().splitlines()]
    assert (plan["platform"], plan["quantize"], plan["remat"]) == ("cpu", "nf4", "full") and plan["peak_bytes"] > 0
    assert (tmp_path / "memory_plan.md").read_text().splitlines()[2].startswith("| cpu | 1 | dora | nf4 | full |")


def test_the_inject_fn_rows_take_fewer_flops_than_the_merge_path():
    # an NNX and a plain-JAX model through dj.inject_fn (scripts/benchmark_fn.py): the factored train step
    # compiles to fewer FLOPs than differentiating dj.merge, for both
    argv = ["--models", "nnx_mlp,jax_mlp", "--llama-hidden", "64", "--llama-layers", "1", "--batch", "2"]
    argv += ["--seq", "4", "--rank", "2", "--steps", "1", "--warmup", "1", "--compile-layers", "0"]
    rows = {(r["model"], r["variant"]): r for r in benchmark.main(benchmark.parse_args(argv))}
    assert set(rows) == {(m, v) for m in ("nnx_mlp", "jax_mlp") for v in ("full", *FN_VARIANTS)}
    for model in ("nnx_mlp", "jax_mlp"):
        assert rows[model, "dora_exact/inject_fn"]["gflop"] < rows[model, "dora_exact/merge"]["gflop"]
        assert all(np.isfinite(rows[model, v]["loss"]) for v in FN_VARIANTS)


FN_VARIANTS = ("lora/inject_fn", "dora_exact/inject_fn", "dora_exact/merge")
