"""One record per model family: what training, evaluation, export and the benchmark need to know.

Adding a family to the zoo is adding its module and one ``Family`` entry to ``FAMILIES``; code
elsewhere asks ``family(model)`` instead of testing module classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from dora_jax.errors import ConfigError
from dora_jax.models import bert, llama
from dora_jax.models.bert import BertForSequenceClassification, BertModel
from dora_jax.models.hf_names import Table
from dora_jax.models.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Family:
    """What the rest of dora_jax needs to know about one kind of zoo module.

    Fields:
      hf_table: Flax module regex -> HF module name rules (export, import, PEFT names).
      architecture: HF ``architectures`` entry written to ``config.json``, from the module's config
        (None: the config's own ``to_hf`` names it).
      peft_task_type: PEFT's ``task_type`` for adapters of this module.
      output: "logits" (batch, seq, vocab), "hidden" (batch, seq, hidden) or "labels" (batch, labels).
      inputs: batch keys besides the token ids that ``apply`` takes (e.g. a classifier's masks).
      head: the top-level params key of a new head trained in full with the adapters (PEFT's
        ``modules_to_save``), or None.
      generates: whether it decodes with a key/value cache (greedy and beam search).
      base_kernels: regex of the unrolled params' linear kernels a quantized base stores quantized
        (every one but the head's; embeddings and norms are not kernels).
    """

    hf_table: Table
    architecture: Callable[[Any], str] | None
    peft_task_type: str
    output: str
    inputs: tuple[str, ...] = ()
    head: str | None = None
    generates: bool = False
    base_kernels: str = r".*/kernel"


FAMILIES: dict[type, Family] = {
    LlamaForCausalLM: Family(
        hf_table=llama.HF_MODULES,
        architecture=None,  # LlamaConfig.to_hf names Llama, Mistral or Qwen2
        peft_task_type="CAUSAL_LM",
        output="logits",
        generates=True,
        base_kernels=r"layers_\d+/.*/kernel",  # not lm_head
    ),
    BertModel: Family(
        hf_table=bert.hf_modules(classifier=False),
        architecture=lambda config: "RobertaModel" if config.model_type == "roberta" else "BertModel",
        peft_task_type="FEATURE_EXTRACTION",
        output="hidden",
        base_kernels=r"(encoder|pooler)/.*/kernel",
    ),
    BertForSequenceClassification: Family(
        hf_table=bert.hf_modules(classifier=True),
        architecture=lambda config: "BertForSequenceClassification",
        peft_task_type="SEQ_CLS",
        output="labels",
        inputs=("attention_mask", "token_type_ids"),
        head="classifier",
        base_kernels=r"bert/(encoder|pooler)/.*/kernel",  # not the classifier
    ),
}


def family(model: nn.Module) -> Family:
    """The family record of a zoo module; a ConfigError for any other module."""
    found = FAMILIES.get(type(model))
    if found is None:
        raise ConfigError(f"{type(model).__name__} is not a model of the zoo {[c.__name__ for c in FAMILIES]}")
    return found
