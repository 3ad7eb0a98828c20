"""The paper's Fig. 2 on this project's default task: full fine-tuning, LoRA and DoRA, 3 seeds each.

    python -m dora_jax.sweep --config=configs/sweeps/decomposition.py --workdir=runs/decomposition
    python -m dora_jax.analysis --workdirs runs/decomposition

The default run (DoRA r=8 on q, k, v, up, down adapting the synthetic base from ``copy`` to
``shift``) with a checkpoint every 50 of its 200 steps, all kept: 3 intermediate snapshots and
the final one, which ``dora_jax.analysis`` reads to place every query and value kernel in the
(ΔD, ΔM) plane. Each seed has its own synthetic base (the base's recipe includes the seed).
"""

from dora_jax import run_config, sweep


def get_config():
    c = run_config.defaults()
    c.train.progress_bar = False
    c.checkpoint.update(every=50, keep_period=50)
    return c


def get_sweep():
    methods = [{"train.finetune": "full"}, {"adapter.method": "lora"}, {"adapter.method": "dora"}]
    return sweep.product(methods, {"seed": [0, 1, 2]})
