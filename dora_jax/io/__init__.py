"""Files in and out: HF safetensors checkpoints and tokenizers."""

from dora_jax.io.hf import load_hf, load_tokenizer, read_config, save_hf
from dora_jax.io.safetensors_dir import CheckpointError, SafetensorsDirectory

__all__ = ["CheckpointError", "SafetensorsDirectory", "load_hf", "load_tokenizer", "read_config", "save_hf"]
