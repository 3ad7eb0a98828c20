"""The DoRA paper's rank study (Table 15): LLaMA-7B commonsense, LoRA and DoRA at r = 4..64, alpha = 2r.

    python -m dora_jax.sweep --config=configs/sweeps/paper_rank.py --workdir=DIR \\
        --config.model.hf_dir=/path/to/llama-7b-hf --config.data.path=/path/to/commonsense_170k.json

The run setting is configs/commonsense.py's (targets q, k, v, up, down; dropout 0.05; 3 epochs;
batch 16; cutoff 256; linear decay after 100 warmup steps; bfloat16 base). Learning rates as the
paper's: DoRA 1e-4 at r=32 and 2e-4 at other ranks, LoRA 3e-4. Reported averages over the eight
tasks (LoRA / DoRA): r=4 39.5 / 61.9, r=8 40.7 / 77.9, r=16 70.9 / 77.5, r=32 74.7 / 78.4, r=64
65.8 / 72.1. The model and data paths are placeholders: the sweep refuses to start until they
are given.
"""

import importlib.util
import pathlib

RANKS = (4, 8, 16, 32, 64)


def _commonsense():
    path = pathlib.Path(__file__).resolve().parents[1] / "commonsense.py"
    spec = importlib.util.spec_from_file_location("configs_commonsense", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def learning_rate(method: str, rank: int) -> float:
    """The paper's learning rate for a method and rank (configs/commonsense.py's values)."""
    if method == "lora":
        return 3e-4
    return 1e-4 if rank == 32 else 2e-4


def get_config():
    return _commonsense().get_config("llama7b_dora_r32")  # paths left as placeholders


def get_sweep():
    return [
        {
            "adapter.method": method,
            "adapter.rank": rank,
            "adapter.alpha": 2.0 * rank,
            "train.learning_rate": learning_rate(method, rank),
        }
        for method in ("lora", "dora")
        for rank in RANKS
    ]
