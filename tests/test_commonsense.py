"""The LLM-Adapters commonsense format: records, the official prompts, answers, tokenised batches."""

import json
import pathlib

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers, processors

from conftest import load_config
from dora_jax import io, models, run_config, train
from dora_jax.data import commonsense as cs
from dora_jax.data.instruction import InstructionSource, encode
from dora_jax.errors import ConfigError

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
IND = " " * 16
RECORD = {"instruction": "Is water wet?", "input": "", "output": "the correct answer is true", "answer": "true"}
WITH_INPUT = {"instruction": "Translate.", "input": "Grüße, 世界", "output": "greetings, world", "answer": "x"}


def real_files():
    if not SHARED.exists():
        return []
    return [(task, path) for task in cs.TASKS for path in sorted((SHARED / task).glob("*.json"))]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/commonsense is absent")
@pytest.mark.parametrize("task, path", real_files(), ids=lambda v: str(v).split("commonsense/")[-1])
def test_extract_answer_recovers_every_real_records_answer(task, path):
    records = cs.load(path)
    assert len(records) > 100
    assert [cs.extract_answer(task, r["output"]) for r in records] == [r["answer"] for r in records]


def test_training_prompt_without_input_is_the_official_text():
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.  \n\n"
        f"{IND}### Instruction:\n{IND}Is water wet?\n{IND}\n{IND}### Response:\n{IND}the correct answer is true"
    )
    assert cs.prompt(RECORD, train=True) == expected


def test_training_prompt_with_input_is_the_official_text():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        f"{IND}### Instruction:\n{IND}Translate.\n{IND}\n"
        f"{IND}### Input:\n{IND}Grüße, 世界\n{IND}\n{IND}### Response:\n{IND}greetings, world"
    )
    assert cs.prompt(WITH_INPUT, train=True) == expected


def test_evaluation_prompts_are_the_official_texts():
    assert cs.prompt(RECORD) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
        f"{IND}### Instruction:\n{IND}Is water wet?\n\n{IND}### Response:\n{IND}"
    )
    assert cs.prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        f"{IND}### Instruction:\n{IND}Translate.\n\n{IND}### Input:\n{IND}Grüße, 世界\n\n{IND}### Response:\n{IND}"
    )


def test_extract_answer_takes_the_first_match_or_nothing():
    assert cs.extract_answer("piqa", "solution2, not solution1") == "solution2"
    assert cs.extract_answer("winogrande", "no idea") == ""
    assert cs.extract_answer("hellaswag", cs.response(cs.prompt(RECORD) + " ending3")) == "ending3"
    with pytest.raises(cs.DataError, match=r"task 'siqa' is unknown; tasks: \['boolq'"):
        cs.extract_answer("siqa", "answer1")


def test_malformed_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a",\n   "input": }\n]')
    with pytest.raises(cs.DataError, match=rf"{path}:3:\d+: not valid JSON"):
        cs.load(path)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORD) + "\n{oops\n")
    with pytest.raises(cs.DataError, match=rf"{path}:2: not valid JSON"):
        cs.load(path)


def test_missing_field_names_the_file_record_and_field(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([RECORD, {k: v for k, v in RECORD.items() if k != "output"}]))
    with pytest.raises(cs.DataError, match=rf"{path}: record 1 has no field 'output'"):
        cs.load(path)


def word_tokenizer(texts, directory=None):
    """A word-level tokenizer.json with <unk>=0, <s>=1, </s>=2 that adds <s> like Llama's."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if directory is not None:
        tokenizer.save(str(pathlib.Path(directory) / "tokenizer.json"))
    return tokenizer


def test_encoding_masks_the_prompt_and_appends_eos():
    tokenizer = word_tokenizer([cs.prompt(RECORD, train=True)])
    ids, trained = encode(RECORD, tokenizer, cutoff_len=64, eos_id=2, train_on_inputs=False)
    words = cs.prompt(RECORD, train=True).split()
    assert ids.tolist() == [1] + [tokenizer.token_to_id(w) for w in words] + [2]
    response = len("the correct answer is true".split())
    assert trained.tolist() == [False] * (len(ids) - response - 1) + [True] * (response + 1)
    _, everything = encode(RECORD, tokenizer, cutoff_len=64, eos_id=2, train_on_inputs=True)
    assert everything.all()


def test_record_longer_than_the_cutoff_is_truncated_without_eos():
    tokenizer = word_tokenizer([cs.prompt(RECORD, train=True)])
    ids, trained = encode(RECORD, tokenizer, cutoff_len=10, eos_id=2, train_on_inputs=False)
    assert len(ids) == 10 and ids[-1] != 2 and not trained.any()


def tiny_instruction_model(hf_dir, tokenizer):
    """A random one-layer Llama over ``tokenizer``'s vocabulary, written with it as an HF directory."""
    model = models.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=2,
        )
    )
    io.save_hf(model, models.init_params(model, jax.random.key(0)), hf_dir)
    tokenizer.save(str(hf_dir / "tokenizer.json"))


def instruction_file(tmp_path, count=40):
    records = [
        {
            **RECORD,
            "instruction": f"Is item {i} wet?",
            "output": f"the correct answer is {'true' if i % 2 else 'false'}",
        }
        for i in range(count)
    ]
    records[3] = {**WITH_INPUT}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path, records


def test_batches_are_deterministic_host_sharded_and_hold_out_validation(tmp_path):
    path, records = instruction_file(tmp_path)
    tokenizer = word_tokenizer([cs.prompt(r, train=True) for r in records])
    source = lambda seed: InstructionSource(cs.load(path), str(path), tokenizer, 48, 2, seed, 8, False, 4)  # noqa: E731
    a, b = source(0), source(0)
    assert len(a.train) == 32 and len(a.val) == 8 and len(a.eval_batches()) == 2
    for index in (0, 7, 9):  # 9 crosses into the third epoch of 32 records at batch size 8
        whole = a.batch(index, 8)
        np.testing.assert_array_equal(whole["inputs"], b.batch(index, 8)["inputs"])
        halves = [a.batch(index, 8, host, 2) for host in (0, 1)]
        np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), whole["inputs"])
    assert not np.array_equal(a.batch(0, 8)["inputs"], source(1).batch(0, 8)["inputs"])
    epoch = np.concatenate([a.batch(i, 8)["inputs"] for i in range(4)])
    assert len({row.tobytes() for row in epoch}) == 32  # one epoch visits each training record once


def test_instruction_tuning_runs_end_to_end(tmp_path):
    path, records = instruction_file(tmp_path)
    hf_dir = tmp_path / "base"
    tokenizer = word_tokenizer([cs.prompt(r, train=True) for r in records])
    tiny_instruction_model(hf_dir, tokenizer)
    c = run_config.defaults()
    c.model.hf_dir = str(hf_dir)
    c.data.update(source="instruction", path=str(path), cutoff_len=48, val_size=8, eval_batch_size=8)
    c.train.update(epochs=1, batch_size=8, eval_every=2, log_every=1, progress_bar=False, warmup_steps=1)
    c.checkpoint.async_save = False
    summary = train.train_and_evaluate(c, tmp_path / "run")
    assert summary["steps"] == 4  # one epoch: 32 training records (40 less 8 held out) in batches of 8
    assert summary["after"]["loss"] < summary["before"]["loss"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir)


@pytest.mark.parametrize(
    "variant", ["llama7b_dora_r32", "llama7b_lora_r32", "llama3_8b_dora_r32", "llama7b_dora_qkv_magnitude_qkvogud"]
)
def test_paper_configs_are_valid_and_refuse_to_start_without_paths(tmp_path, variant):
    c = load_config("configs/commonsense.py", variant)
    run_config.check(c)
    cfg = run_config.adapter_config(c)
    assert cfg.rank * 2 == cfg.alpha and c.train.epochs == 3 and c.train.batch_size == 16
    if variant.endswith("magnitude_qkvogud"):  # Table 6: direction on q, k, v; magnitude on the rest too
        assert "o_proj" in cfg.magnitude_targets and "o_proj" not in cfg.targets and "q_proj" in cfg.targets
    with pytest.raises(ConfigError, match=r"data.path is not set \('<path to commonsense_170k.json>'\)"):
        train.train_and_evaluate(c, tmp_path)
    c.data.path = str(instruction_file(tmp_path)[0])
    with pytest.raises(ConfigError, match=r"model.hf_dir is not set .*: pass --config.model.hf_dir=PATH"):
        train.train_and_evaluate(c, tmp_path)
