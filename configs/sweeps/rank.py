"""Rank sweep: LoRA and DoRA at ranks 1-16, 3 seeds each, on an offline synthetic task.

    python -m dora_jax.sweep --config=configs/sweeps/rank.py --workdir=runs/rank

The default base (a 2-layer Llama pretrained on ``copy``) adapts to ``reverse`` (y = x backwards),
which moves every answer token to a new position: a rank-1 adapter on q, k, v, up, down learns it
only in part within the step budget, so rank and method show in the final exact match and loss
instead of all points saturating at 1.0. 30 points of 300 steps each.
"""

from dora_jax import run_config, sweep


def get_config():
    c = run_config.defaults()
    c.data.task = "reverse"
    c.train.update(steps=300, warmup_steps=20, learning_rate=5e-3, eval_every=300, log_every=20, progress_bar=False)
    c.checkpoint.every = 300
    c.export.peft = False  # the sweep reads summary.json; adapters stay in the checkpoints
    return c


def get_sweep():
    return sweep.product(
        {"adapter.method": ["lora", "dora"]},
        {"adapter.rank": [1, 2, 4, 8, 16]},
        {"seed": [0, 1, 2]},
    )
