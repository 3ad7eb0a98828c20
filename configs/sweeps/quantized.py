"""QDoRA against DoRA (paper §6.1): the same DoRA run over a frozen base stored as-is, NF4 or int8.

    python -m dora_jax.sweep --config=configs/sweeps/quantized.py --workdir=runs/quantized

The default run (configs/default.py: DoRA r=8 adapting the small synthetic Llama from ``copy`` to
``shift``), its base's linear kernels quantized (``model.quantize``; the head and embeddings stay in
float32). Three points of the default's 300 steps, seed 0.
"""

from dora_jax import run_config, sweep


def get_config():
    c = run_config.defaults()
    c.train.progress_bar = False
    c.export.peft = False  # the sweep reads summary.json
    return c


def get_sweep():
    return sweep.product({"model.quantize": ["none", "nf4", "int8"]})
