"""GLUE-style sentence classification with an encoder (e.g. MiniLM-L6, BERT-base), one task per argument.

    python -m dora_jax.train --config=configs/glue.py:sst2 --workdir=DIR \\
        --config.model.hf_dir=/path/to/all-MiniLM-L6-v2 --config.data.tfds_data_dir=/path/to/tensorflow_datasets
    python -m dora_jax.evaluate --workdir=DIR --tfds=glue/sst2 --tfds_split=validation \\
        --tfds_data_dir=/path/to/tensorflow_datasets

DoRA r=8, alpha=16 on every linear layer of the encoder, plus a new classification head trained
in full (PEFT's modules_to_save); 3 epochs over the TFDS train split less 1,000 held-out records;
batch 32; 128 tokens; AdamW 1e-3 with 6% linear warmup (of a typical epoch count) and linear decay.
"""

from dora_jax import run_config
from dora_jax.data import classification

TASKS = {name.removeprefix("glue/"): name for name in classification.TFDS_TASKS}  # sst2 -> glue/sst2, bool_q


def get_config(task: str = "sst2"):
    if task not in TASKS:
        raise ValueError(f"configs/glue.py: unknown task {task!r}; choose one of {sorted(TASKS)}")
    name = TASKS[task]
    c = run_config.defaults()
    c.model.hf_dir = "<path to the encoder's HF directory>"  # a placeholder: the run refuses to start with it
    c.model.num_labels = classification.num_labels(name)
    c.adapter.update(method="dora", rank=8, alpha=16.0, norm_grad="detach")
    c.adapter.targets = r".*/encoder/.*/kernel"
    c.data.update(source="classification", tfds_name=name, tfds_split="train", cutoff_len=128, val_size=1000)
    c.data.eval_batch_size = 128
    c.train.update(epochs=3, batch_size=32, learning_rate=1e-3, schedule="linear", warmup_steps=300, eval_every=500)
    c.checkpoint.update(every=500, keep=2)
    c.export.merged = True
    return c
