"""QDoRA against DoRA on real weights: MiniLM-L6 classifying the BoolQ questions over a base stored
as-is, NF4 or int8.

    python -m scripts.boolq_questions --data_dir ../shared/data/commonsense --out runs/boolq_questions
    python -m dora_jax.sweep --config=configs/sweeps/quantized_minilm.py --workdir=runs/quantized_minilm \\
        --config.model.hf_dir=/path/to/all-MiniLM-L6-v2 --config.data.path=runs/boolq_questions/train.jsonl
    python -m dora_jax.evaluate --workdir=runs/quantized_minilm/<point> --data_path=runs/boolq_questions/test.jsonl

DoRA r=8 on every encoder linear layer at lr 1e-3 with the new head trained in full, as in
configs/sweeps/decomposition_minilm.py (its Fig. 2 run), 300 steps of batch 32, seed 0; one point per
``model.quantize``. The model and data paths are placeholders the sweep refuses to start without.
"""

from configs.sweeps import decomposition_minilm
from dora_jax import sweep


def get_config():
    c = decomposition_minilm.get_config()
    c.adapter.method = "dora"
    c.train.learning_rate = 1e-3
    c.checkpoint.update(every=300, keep_period=0)
    return c


def get_sweep():
    return sweep.product({"model.quantize": ["none", "nf4", "int8"]})
