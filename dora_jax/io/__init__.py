"""Files in and out: HF safetensors checkpoints, tokenizers, PEFT adapter directories."""

from dora_jax.io.hf import classifier_config, load_hf, load_tokenizer, quantize_base, read_config, save_hf
from dora_jax.io.peft import export_peft, import_peft, read_peft_head
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

__all__ = [
    "CheckpointError",
    "SafetensorsDirectory",
    "classifier_config",
    "export_peft",
    "import_peft",
    "load_hf",
    "load_tokenizer",
    "quantize_base",
    "read_config",
    "read_peft_head",
    "save_hf",
]
