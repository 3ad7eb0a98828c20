"""run_config.check: every value a run cannot use is a named error before anything is built."""

import pytest

from dora_jax import run_config
from dora_jax.errors import ConfigError

ERRORS = [
    ({"train.schedule": "step"}, r"train.schedule: expected one of \['constant', 'cosine', 'linear'\]; got 'step'"),
    ({"model.remat": "some"}, r"model.remat: expected one of \['dots', 'full', 'none'\]; got 'some'"),
    ({"data.source": "csv"}, r"data.source 'csv' is unknown; sources: \['synthetic', 'instruction', 'tfds'"),
    ({"train.grad_accum": 3}, r"train.batch_size=32 is not divisible by train.grad_accum=3"),
    ({"train.grad_accum": 0}, r"train.grad_accum: expected a positive integer; got 0"),
    ({"adapter.method": "ia3"}, r"AdapterConfig.method: expected one of 'dora', 'lora', 'vera', 'dvora'; got 'ia3'"),
    ({"adapter.method": "full"}, r"adapter.method='full': full fine-tuning is train.finetune='full'"),
    ({"train.finetune": "head"}, r"train.finetune: expected one of \['adapter', 'full'\]; got 'head'"),
    ({"adapter.norm_grad": "none"}, r"AdapterConfig.norm_grad: expected one of 'exact', 'detach'; got 'none'"),
    ({"adapter.fallback": "skip"}, r"AdapterConfig.fallback: expected one of 'merge', 'error'; got 'skip'"),
    ({"adapter.rank": 0}, r"AdapterConfig.rank: expected a positive integer; got 0"),
    ({"model.quantize": "nf2"}, r"model.quantize / model.quantize_block: quantize: expected one of \('none', 'nf4'"),
    ({"model.quantize": "nf4", "model.quantize_block": 0}, r"quantize='nf4' needs a block size >= 1 .*; got 0"),
    ({"model.quantize_block": -2, "model.quantize": "int8"}, r"quantize block size: expected >= 0 .*; got -2"),
    ({"model.quantize": "int8", "train.finetune": "full"}, r"model.quantize='int8' with train.finetune='full'"),
    (
        {"adapter.stacked_axes": {"w": 1}},
        r"adapter.stacked_axes is for dj.inject_fn .* leave adapter.stacked_axes=\{\}",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), ERRORS, ids=[next(iter(o)) for o, _ in ERRORS])
def test_check_names_the_key_and_the_valid_choices(overrides, message):
    config = run_config.defaults()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        run_config.check(config)


def test_full_fine_tuning_skips_the_adapter_fields():
    config = run_config.defaults()
    config.train.finetune = "full"
    config.adapter.rank = 0  # no adapter: its fields are not used
    run_config.check(config)
    assert run_config.adapter_config(config) is None and run_config.method_name(config) == "full"


def test_a_config_stored_before_train_finetune_reads_as_today():
    stored = run_config.flat(run_config.defaults())
    del stored["train.finetune"]
    full = run_config.from_flat({**stored, "adapter.method": "full"})
    assert full.train.finetune == "full" and full.adapter.method == "dora"
    lora = run_config.from_flat({**stored, "adapter.method": "lora"})
    assert lora.train.finetune == "adapter" and lora.adapter.method == "lora"


def test_the_adapter_section_is_adapter_configs_fields():
    from dora_jax.core import AdapterConfig

    section = run_config.defaults().adapter.to_dict()
    assert AdapterConfig.from_dict(section).to_dict() == section
