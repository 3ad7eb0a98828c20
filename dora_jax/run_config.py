"""The schema of a training run: every key ``python -m dora_jax.train`` reads, with its default.

``defaults()`` is the offline default experiment (configs/default.py returns it); other configs
start from it and override. ``check(config)`` rejects keys the schema lacks, naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import ml_collections

from dora_jax.core import AdapterConfig, quantize
from dora_jax.data import SOURCES
from dora_jax.errors import ConfigError
from dora_jax.models.layers import ATTENTIONS
from dora_jax.models.llama import REMAT

FINETUNES = ("adapter", "full")  # train.finetune: the adapters (adapter.*) or every weight
SCHEDULES = ("constant", "cosine", "linear")  # after the warmup
# Keys that may change between a run and its resumption: they do not change what is computed.
RUNTIME_KEYS = (
    "train.stop_at",
    "train.log_every",
    "train.progress_bar",
    "checkpoint.async_save",
    "checkpoint.keep_period",  # which snapshots stay on disk, not what is computed
    "adapter.fallback",  # merge or refuse an unroutable target: the same result either way
)
PAPER_TARGETS = r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel"  # the paper's q, k, v, up, down


def adapter_defaults() -> ml_collections.ConfigDict:
    """The ``adapter.*`` keys: every AdapterConfig field with its default (the dataclass is the one
    place a field is defined) with the paper's targets."""
    values = {}
    for field in dataclasses.fields(AdapterConfig):
        values[field.name] = PAPER_TARGETS if field.name == "targets" else field.default
    values["input_axes"] = {}  # {regex: axes} in a config; the dataclass stores it as pairs
    values["stacked_axes"] = {}  # {regex: count}, likewise
    return ml_collections.ConfigDict(values)


def defaults() -> ml_collections.ConfigDict:
    """The default run: DoRA on a synthetic task over a small Llama built on first use."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # everything random (init, dropout, data order) derives from it
    c.distributed = False  # call jax.distributed.initialize() (multi-host)

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""  # local HF directory of the base model; "" = the synthetic base below
    c.model.dtype = "float32"  # dtype of the params
    c.model.num_labels = 0  # > 0: a BERT-family encoder as a sequence classifier (head trained with the adapters)
    c.model.remat = "none"  # Llama: none | full | dots, recompute layer activations in the backward (long sequences)
    c.model.scan_layers = False  # Llama: one nn.scan over the decoder layers (stacked params; compiles once per layer)
    c.model.attention = "auto"  # Llama: recompute | xla | cudnn | splash | auto (cuDNN on GPUs, splash on TPUs, ...)
    c.model.compute_dtype = "float32"  # dtype of activations (bfloat16 on accelerators)
    c.model.quantize = "none"  # none | nf4 | int8: the frozen base's linear kernels stored quantized (QDoRA, QLoRA)
    c.model.quantize_block = -1  # inputs per quantization scale; 0: one per output column; -1: NF4 64, int8 0
    c.model.base = ml_collections.ConfigDict()  # the synthetic base, built on first use and cached
    c.model.base.cache_dir = ""  # where to keep it; "" = $DORA_JAX_CACHE or ~/.cache/dora_jax
    c.model.base.task = "copy"  # synthetic task it is pretrained on
    c.model.base.steps = 400  # pretraining steps (0: random weights)
    c.model.base.batch_size = 64
    c.model.base.learning_rate = 3e-3
    c.model.base.architecture = dict(  # HF config.json of the base model
        model_type="llama",
        vocab_size=16,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )

    c.adapter = adapter_defaults()  # AdapterConfig's fields (docs/concepts.md); unused with train.finetune="full"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic (offline) | instruction (LLM-Adapters JSON/JSONL) | tfds | classification
    c.data.task = "shift"  # synthetic: the task adapted to; the base knows only model.base.task
    c.data.length = 8  # digits per sequence
    c.data.num_symbols = 10
    c.data.eval_batches = 4  # synthetic: held-out batches per evaluation
    c.data.eval_batch_size = 128
    c.data.path = ""  # instruction / classification: the training file (e.g. commonsense_170k.json)
    c.data.tfds_name = ""  # tfds: piqa, bool_q, ai2_arc/ARC-Easy, ...; classification: glue/sst2, glue/mrpc, ...
    c.data.tfds_split = "train"  # tfds: the split trained on (val_size records of it are held out)
    c.data.tfds_data_dir = ""  # tfds: where it was prepared (array_record); "" = TFDS's default
    c.data.tokenizer_dir = ""  # instruction/tfds: directory with tokenizer.json; "" = model.hf_dir
    c.data.cutoff_len = 256  # instruction/tfds/classification: tokens per example (the paper's cutoff)
    c.data.val_size = 120  # instruction/tfds/classification: records held out for evaluation (the paper's 120)
    c.data.train_on_inputs = False  # instruction/tfds: loss on the prompt too, not only the response

    c.train = ml_collections.ConfigDict()
    c.train.finetune = "adapter"  # adapter: train the adapter.* (and a classifier's head); full: every weight
    c.train.steps = 200  # optimizer steps (ignored when train.epochs > 0)
    c.train.epochs = 0  # > 0: steps = epochs x the steps of one pass over the training data
    c.train.batch_size = 32  # global batch (sequences) per optimizer step
    c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
    c.train.learning_rate = 5e-3
    c.train.schedule = "cosine"  # cosine | linear | constant, after warmup
    c.train.warmup_steps = 20
    c.train.end_learning_rate_ratio = 0.0  # final lr / peak lr
    c.train.weight_decay = 0.0  # AdamW decay of A, B and (full fine-tuning, a head) every matrix
    c.train.magnitude_weight_decay = 0.0  # AdamW decay of m (PEFT decays every trainable tensor alike)
    c.train.magnitude_lr_ratio = 1.0  # m's learning rate / train.learning_rate
    c.train.loraplus_ratio = 1.0  # B's learning rate / A's (LoRA+, Hayou et al. 2024, suggest 16)
    c.train.clip_norm = 1.0  # global gradient-norm clipping (0: off)
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.progress_bar = True
    c.train.stop_at = 0  # stop this invocation after this step (0: run to train.steps); resume later

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = ()  # logical-axis rules ((name, mesh axis), ...); () = parallel.DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # steps between checkpoints (and one at the end)
    c.checkpoint.keep = 2  # newest checkpoints kept
    c.checkpoint.keep_period = 0  # > 0: also keep every saved step divisible by it (snapshots for dora_jax.analysis)
    c.checkpoint.async_save = True

    c.export = ml_collections.ConfigDict()
    c.export.peft = True  # adapter directory in PEFT format at workdir/adapter
    c.export.merged = False  # merged HF model at workdir/merged
    return c


DICT_VALUES = ("architecture", "input_axes", "stacked_axes")  # keys whose value is a dict, not a section


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and not path.endswith(DICT_VALUES):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return out


def flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted key -> value, the form configs are compared and stored in."""
    return _flatten(config)


def check_key(key: str, valid: dict[str, Any], where: str = "config key") -> None:
    """ConfigError for a dotted key the schema ``valid`` (``flat(defaults())``) lacks, naming the
    valid keys of its section."""
    if key not in valid:
        section = key.rpartition(".")[0]
        siblings = sorted(k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section)
        raise ConfigError(f"{where} {key!r} is unknown; valid keys in {section or 'the top level'!r}: {siblings}")


def set_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets the dotted ``key`` (``"adapter.rank"``) of ``config``."""
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a key the schema lacks or a value the run cannot use, before anything
    is built: what trains, the adapter's fields, choices (schedule, remat, data source), accumulation."""
    valid = flat(defaults())
    for key in flat(config):
        check_key(key, valid)
    if config.adapter.method == "full" and config.train.finetune != "full":
        raise ConfigError("adapter.method='full': full fine-tuning is train.finetune='full' (adapter.* then unused)")
    adapter = adapter_config(config)  # AdapterConfig validates its fields, naming the field and the choices
    if adapter is not None and adapter.stacked_axes:
        raise ConfigError(
            "adapter.stacked_axes is for dj.inject_fn over a model of stacked kernels; the zoo's models keep one "
            "kernel per layer (model.scan_layers stacks them itself): leave adapter.stacked_axes={}"
        )
    if adapter is not None and adapter.method == "dvora" and config.export.peft:
        raise ConfigError(
            "adapter.method='dvora' with export.peft=True: PEFT has no DVoRA; set export.peft=False "
            "(and export.merged=True for the merged model)"
        )
    try:
        quantize.check_scheme(config.model.quantize, quantize_block(config))
    except ValueError as err:
        raise ConfigError(f"model.quantize / model.quantize_block: {err}") from None
    if config.model.quantize != "none" and config.train.finetune == "full":
        raise ConfigError(
            f"model.quantize={config.model.quantize!r} with train.finetune='full': a quantized base is frozen; "
            "train adapters (train.finetune='adapter') or set model.quantize='none'"
        )
    choices = (
        ("train.schedule", config.train.schedule, list(SCHEDULES)),
        ("model.remat", config.model.remat, sorted(REMAT)),
        ("model.attention", config.model.attention, list(ATTENTIONS)),
    )
    for key, value, valid in choices:
        if value not in valid:
            raise ConfigError(f"{key}: expected one of {valid}; got {value!r}")
    if config.data.source not in SOURCES:
        raise ConfigError(f"data.source {config.data.source!r} is unknown; sources: {list(SOURCES)}")
    t = config.train
    positive = ["train.batch_size", "train.grad_accum", "train.log_every", "train.eval_every", "data.eval_batch_size"]
    positive += ["checkpoint.every", "checkpoint.keep"]
    values = flat(config)
    for key in positive:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: expected a positive integer; got {value!r}")
    # train.steps=0 evaluates and exports the initial state (the synthetic base with model.base.steps=0)
    for key in ("train.steps", "train.epochs", "train.warmup_steps", "train.stop_at", "checkpoint.keep_period"):
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 0:
            raise ConfigError(f"{key}: expected a non-negative integer; got {values[key]!r}")
    for key in ("train.learning_rate", "train.magnitude_lr_ratio", "train.loraplus_ratio"):
        if not _real(values[key]) or values[key] <= 0:
            raise ConfigError(f"{key}: expected a positive number; got {values[key]!r}")
    for key in ("train.weight_decay", "train.magnitude_weight_decay"):
        if not _real(values[key]) or values[key] < 0:
            raise ConfigError(f"{key}: expected a non-negative number; got {values[key]!r}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def placeholders(config: ml_collections.ConfigDict) -> list[str]:
    """Keys whose value is a ``<placeholder>`` a config file left for the user to fill (a path)."""
    return [k for k, v in flat(config).items() if isinstance(v, str) and v.startswith("<") and v.endswith(">")]


def parse_flags(flag_values: Any, args: list[str], program: str) -> list[str]:
    """Parses a CLI's flags; a bad flag, a missing config file or one that does not run (a syntax
    error, an exception in get_config) exits with one line that names it instead of a traceback."""
    from absl import flags

    try:
        return flag_values(args)
    except SyntaxError as err:
        sys.exit(f"{program}: config file {err.filename}, line {err.lineno}: {err.msg}")
    except (flags.Error, AttributeError, KeyError, ValueError, OSError, TypeError) as err:
        message = " ".join(str(err).replace("\\n", " ").split()).strip("'\"")
        sys.exit(f"{program}: bad flag or config file: {message}")


def loaded(config: Any, program: str) -> ml_collections.ConfigDict:
    """A ``--config`` flag's value; config_flags defers a file that failed to load (missing, or an
    exception in get_config) to first use: that exits here with one line naming the file."""
    try:
        config.keys()
    except (OSError, ValueError, TypeError, AttributeError) as err:
        message = " ".join(str(err).split())
        sys.exit(f"{program}: config file: {message}")
    return config


def require_path(key: str, value: str) -> str:
    """``value``, unless it is empty or a ``<placeholder>`` a config left for the user to fill."""
    if not value or (value.startswith("<") and value.endswith(">")):
        raise ConfigError(f"{key} is not set ({value!r}): pass --config.{key}=PATH")
    return value


def adapter_config(config: ml_collections.ConfigDict) -> AdapterConfig | None:
    """The AdapterConfig of a run, or None for full fine-tuning (``train.finetune="full"``)."""
    if config.train.finetune == "full":
        return None
    if config.train.finetune not in FINETUNES:
        raise ConfigError(f"train.finetune: expected one of {list(FINETUNES)}; got {config.train.finetune!r}")
    return AdapterConfig.from_dict(config.adapter)


def quantize_block(config: ml_collections.ConfigDict) -> int | None:
    """``model.quantize_block``, None for -1 (the scheme's default: bitsandbytes' NF4 64, int8 per column)."""
    block = config.model.quantize_block
    return None if block == -1 else block


def method_name(config: ml_collections.ConfigDict) -> str:
    """What a run trains, in a word: "full" or the adapter method."""
    return "full" if config.train.finetune == "full" else config.adapter.method


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A flat config stored by an earlier version in today's keys: ``adapter.method="full"`` was
    full fine-tuning before ``train.finetune`` existed; ``train.decay_magnitude`` (decay m with
    ``train.weight_decay`` or not) before ``train.magnitude_weight_decay``; ``model.scan_layers`` and
    ``model.attention`` did not exist (layers unrolled, attention as "auto" computes it on CPU), nor
    ``model.quantize`` / ``model.quantize_block`` (an unquantized base), nor ``adapter.stacked_axes``."""
    values = dict(values)
    values.setdefault("model.scan_layers", False)  # before scanned layers, every run unrolled them
    values.setdefault("model.attention", "auto")  # and attention as "auto" computes it on CPU
    values.setdefault("model.quantize", "none")  # and the base unquantized
    values.setdefault("model.quantize_block", -1)
    values.setdefault("adapter.stacked_axes", {})  # and no kernel stacked
    if "train.decay_magnitude" in values:
        decays = values.pop("train.decay_magnitude")
        values["train.magnitude_weight_decay"] = values.get("train.weight_decay", 0.0) if decays else 0.0
    if "train.finetune" not in values:
        full = values.get("adapter.method") == "full"
        values["train.finetune"] = "full" if full else "adapter"
        if full:
            values["adapter.method"] = AdapterConfig.method
    return values


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flat configs, ignoring RUNTIME_KEYS."""
    keys = sorted((set(stored) | set(current)) - set(RUNTIME_KEYS))
    return [k for k in keys if stored.get(k) != current.get(k)]


def from_flat(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config whose ``flat`` form is ``values`` (e.g. a workdir's config.json)."""
    config = defaults()
    valid = flat(config)
    for key, value in upgrade(values).items():
        if key not in valid:
            raise ConfigError(f"config key {key!r} is unknown to this version of dora_jax")
        if isinstance(valid[key], tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        set_value(config, key, value)
    return config
