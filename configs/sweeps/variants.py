"""The paper's variants side by side, 3 seeds each, on the rank sweep's offline task (``reverse``).

    python -m dora_jax.sweep --config=configs/sweeps/variants.py --workdir=runs/variants

LoRA and DoRA at r=8 on q, k, v, up, down (the paper's targets); LoRA+ (B's learning rate 16x A's);
DoRA's Table 6 split (A, B on q, k, v; the magnitude alone on o, gate, up, down); VeRA and DVoRA on
the paper's targets at PEFT's default VeRA rank, 256 (their projections are random and shared, the
trained vectors are r + d_out per layer). One learning rate (5e-3) for every method: the point is
the comparison at one setting, not each method's best. 18 points of 300 steps each.
"""

from dora_jax import run_config, sweep

QKV = r".*/(q_proj|k_proj|v_proj)/kernel"
OGUD = r".*/(o_proj|gate_proj|up_proj|down_proj)/kernel"


def get_config():
    c = run_config.defaults()
    c.data.task = "reverse"
    c.train.update(steps=300, warmup_steps=20, learning_rate=5e-3, eval_every=300, log_every=20, progress_bar=False)
    c.checkpoint.every = 300
    c.export.peft = False  # the sweep reads summary.json; adapters stay in the checkpoints (and PEFT has no DVoRA)
    return c


def get_sweep():
    variants = [
        {"adapter.method": "lora"},
        {"adapter.method": "lora", "train.loraplus_ratio": 16.0},
        {"adapter.method": "dora"},
        {"adapter.method": "dora", "adapter.targets": QKV, "adapter.magnitude_targets": OGUD},
        {"adapter.method": "vera", "adapter.rank": 256},
        {"adapter.method": "dvora", "adapter.rank": 256},
    ]
    return sweep.product(variants, {"seed": [0, 1, 2]})
