"""One record per model family: every zoo module has one, and what it says is what the code does."""

import flax.linen as nn
import pytest

from conftest import TINY_BERT, TINY_LLAMA
from dora_jax import models
from dora_jax.errors import ConfigError

ZOO = {
    "llama": dict(TINY_LLAMA, model_type="llama"),
    "mistral": dict(TINY_LLAMA, model_type="mistral"),
    "bert": dict(TINY_BERT, model_type="bert"),
    "roberta": dict(TINY_BERT, model_type="roberta", pad_token_id=1, type_vocab_size=1),
    "bert_classifier": dict(TINY_BERT, model_type="bert", architectures=["BertForSequenceClassification"]),
}


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_module_has_a_family_whose_architecture_round_trips(name):
    model = models.from_hf_config(ZOO[name])
    record = models.family(model)
    assert record is models.FAMILIES[type(model)]
    written = models.hf_config(model)
    assert type(models.from_hf_config(written)) is type(model)  # the written architecture loads back as itself
    if record.output == "labels":
        assert written["architectures"] == ["BertForSequenceClassification"] and record.head == "classifier"


def test_the_family_records_say_which_models_generate_and_which_train_a_head():
    generating = {cls.__name__ for cls, record in models.FAMILIES.items() if record.generates}
    with_head = {cls.__name__ for cls, record in models.FAMILIES.items() if record.head}
    assert generating == {"LlamaForCausalLM"} and with_head == {"BertForSequenceClassification"}


def test_a_module_outside_the_zoo_is_named_with_the_zoo():
    with pytest.raises(ConfigError, match=r"Dense is not a model of the zoo \['LlamaForCausalLM', 'BertModel'"):
        models.family(nn.Dense(3))
