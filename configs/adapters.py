"""Adapter settings of the DoRA paper's commonsense experiments, as ml_collections configs.

    --config=configs/adapters.py:dora_r32      (also dora_r16, dora_r8, lora_r32)

Targets are the paper's q, k, v, up and down projections of a Llama-family model (HF names,
as in the model zoo). Turn one into an AdapterConfig with
``AdapterConfig.from_dict(get_config("dora_r32"))``.
"""

import ml_collections

from dora_jax import run_config

PRESETS = {
    # Paper, LLaMA-7B / Llama-3-8B: r=32, alpha=64, dropout 0.05, lr 1e-4 (DoRA) / 3e-4 (LoRA).
    "dora_r32": dict(method="dora", rank=32, alpha=64.0),
    "lora_r32": dict(method="lora", rank=32, alpha=64.0),
    # The paper's half-rank DoRA runs (alpha = 2r).
    "dora_r16": dict(method="dora", rank=16, alpha=32.0),
    "dora_r8": dict(method="dora", rank=8, alpha=16.0),
}


def get_config(preset: str = "dora_r32") -> ml_collections.ConfigDict:
    """The adapter fields of one preset: every AdapterConfig field, the paper's targets (q, k, v, up, down)."""
    if preset not in PRESETS:
        raise ValueError(f"configs/adapters.py: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = run_config.adapter_defaults()
    config.update(dropout=0.05, norm_grad="detach", **PRESETS[preset])  # LLM-Adapters' dropout; paper section 4.3
    return config
