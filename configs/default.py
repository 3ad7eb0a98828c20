"""The default run: DoRA on an offline synthetic task, over a small Llama built on first use.

    python -m dora_jax.train --config=configs/default.py --workdir=/tmp/dora_default

The base model (2 layers, hidden 64) is pretrained once on ``copy`` (y = x) and cached as an HF
directory; DoRA (r=8, q,k,v,up,down) then adapts it to ``shift`` (y = x + 1 mod 10), which the
base cannot do. Every key and its meaning: dora_jax/run_config.py.
"""

from dora_jax import run_config


def get_config():
    return run_config.defaults()
