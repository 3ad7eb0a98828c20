#!/usr/bin/env bash
# The accelerator check: what a lent GPU (or TPU) machine runs in a few minutes, nothing to install
# beyond JAX, Flax, Optax, Orbax, PyTorch and PEFT. The benchmark (scripts/benchmark.py) on a ~1B Llama
# shape, bfloat16 compute over float32 params: full fine-tuning, LoRA and DoRA (exact and detached
# norm) on the factored and folded forwards, and PEFT's full / LoRA / DoRA steps of the same shape and
# loss in the same round-robin loop; tokens/s, MFU (compiled FLOPs over the device's bfloat16 peak,
# 'auto' from its device_kind), peak memory; the train step's compile time for 32 layers unrolled and
# scanned (model.scan_layers, scripts/compile_time.py); the Llama rows again with XLA's attention in
# place of "auto" (cuDNN's on a GPU, splash on a TPU); QLoRA and QDoRA (an NF4 base) beside them; the memory plan
# (scripts/memory_plan.py) of the paper's Llama-3-8B DoRA r=32 run (batch 16 x 256, bfloat16, scanned
# layers) compiled for this device, QDoRA and DoRA, remat full and none. Writes DIR/device_check.{json,md},
# DIR/compile_time.{json,md}, DIR/attention_xla.{json,md} and DIR/memory_plan.{jsonl,md}, and each stage's
# output to DIR/STAGE.log (DIR: $1, else $OUT when set, as on the device machine, else device_check/).
#
#   bash scripts/device_check.sh                 # ~1B shape: hidden 2048, 16 layers, 32k vocab, 16 x 1024 tokens
#   DEVICE_CHECK_SHAPE=tiny bash scripts/device_check.sh /tmp/check   # the test suite's CPU run
#   DEVICE_CHECK_STAGES="memory_plan benchmark" DEVICE_CHECK_VARIANTS=dora_exact,qlora,qdora bash scripts/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_check}}"
mkdir -p "$out"
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# PyTorch shares the device with JAX in one process: JAX must not take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "${DEVICE_CHECK_SHAPE:-1b}" = tiny ]; then
  shape=(--llama-hidden 64 --llama-layers 1 --llama-vocab 128 --batch 2 --seq 16 --rank 2 --steps 2 --warmup 1
    --dtype float32)
  compile=(--layers 2 --hidden 64 --rank 2 --seq 16 --repeats 1)
  plan=(--config=configs/default.py)
  plans=("--config.model.quantize=nf4 --config.model.remat=full")
  tiny_variants=qdora  # the suite's run: each stage once (dora_exact runs in the attention stage)
  paths=factored  # (the folded path of every variant: tests/test_benchmark.py's MiniLM rows)
else
  shape=(--llama-hidden 2048 --llama-layers 16 --llama-vocab 32000 --batch 16 --seq 1024 --rank 16 --steps 10
    --warmup 2 --dtype bfloat16)
  compile=(--layers 32 --hidden 256 --rank 16 --repeats 1)
  plan=(--config=configs/commonsense.py:llama3_8b_dora_r32 --config.model.hf_dir=configs/hf/llama-3-8b
    --config.model.scan_layers=True)
  plans=("--config.model.quantize=nf4 --config.model.remat=full" "--config.model.quantize=nf4 --config.model.remat=none"
    "--config.model.quantize=none --config.model.remat=full" "--config.model.quantize=none --config.model.remat=none")
fi
stages="${DEVICE_CHECK_STAGES:-benchmark compile_time attention_xla memory_plan}"
variants="${DEVICE_CHECK_VARIANTS:-${tiny_variants:-dora_exact,dora_detach,qlora,qdora}}"
# Three independent stages, each writing its own files as it ends: one that fails (or a time limit
# that ends the machine's lease) leaves the others' figures, and the script exits non-zero at the end.
failed=()
stage() {
  local name=$1
  shift
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1 || failed+=("$name")  # the log comes back even when the lease ends mid-stage
  tail -n 30 "$out/$name.log"
}
memory_plans() {  # one process per plan, each appending its JSON line and table row as it ends
  rm -f "$out/memory_plan.jsonl" "$out/memory_plan.md"
  local row
  for row in "${plans[@]}"; do
    # shellcheck disable=SC2086  # a row is several flags
    "$python" -m scripts.memory_plan "${plan[@]}" $row --json --markdown="$out/memory_plan.md" \
      >>"$out/memory_plan.jsonl" || return 1
  done
}
stage benchmark "$python" -m scripts.benchmark --models llama "${shape[@]}" --paths "${paths:-factored,folded}" \
  --variants "$variants" --peft --peak-tflops auto --compile-layers 0 \
  --json "$out/device_check.json" --markdown "$out/device_check.md"
stage compile_time "$python" -m scripts.compile_time "${compile[@]}" \
  --json "$out/compile_time.json" --markdown "$out/compile_time.md"
# The same Llama rows with XLA's attention (model.attention=xla) beside the main run's "auto" (cuDNN's
# fused attention on a GPU in bfloat16, Pallas' splash attention on a TPU, the recomputing kernel on CPU).
stage attention_xla "$python" -m scripts.benchmark --models llama "${shape[@]}" --paths factored \
  --variants dora_exact --peak-tflops auto --attention xla --compile-layers 0 \
  --json "$out/attention_xla.json" --markdown "$out/attention_xla.md"
stage memory_plan memory_plans
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed stages: ${failed[*]}" >&2
  exit 1
fi
echo "written to $out: stages $stages"
