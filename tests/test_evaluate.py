"""Commonsense evaluation by log-likelihood multiple choice, on a run trained in the test."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_commonsense import tiny_instruction_model, word_tokenizer
from test_tfds import piqa_dir  # noqa: F401 (fixture)

from dora_jax import evaluate, metrics, run_config, runs, scoring, train
from dora_jax.data import commonsense as cs
from dora_jax.data.instruction import encode_all, pack_rows
from dora_jax.errors import ConfigError

BOOLQ = [
    {
        "instruction": f"Please answer the following question with true or false, question: is {w} red?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": f"the correct answer is {a}",
        "answer": a,
    }
    for w, a in [("fire", "true"), ("grass", "false"), ("blood", "true"), ("snow", "false"), ("rust", "true")]
]
WINOGRANDE = [
    {
        "instruction": f"Please choose the correct answer to fill in the blank: {w} _ here.\n\n"
        f"Option1: {w} Option2: it Answer format: option1/option2",
        "input": "",
        "output": f"the correct answer is {a}",
        "answer": a,
    }
    for w, a in [("cat", "option1"), ("dog", "option2"), ("owl", "option1")]
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    for task, records in (("boolq", BOOLQ), ("winogrande", WINOGRANDE)):
        (data / task).mkdir(parents=True)
        (data / task / "test.json").write_text(json.dumps(records))
    records = BOOLQ + WINOGRANDE
    texts = [cs.prompt(r, train=True) for r in records] + ["the correct answer is option1 option2 true false"]
    hf_dir = root / "base"
    tokenizer = word_tokenizer(texts)
    tiny_instruction_model(hf_dir, tokenizer)
    (root / "train.json").write_text(json.dumps(records * 4))
    c = run_config.defaults()
    c.model.hf_dir = str(hf_dir)
    c.data.update(source="instruction", path=str(root / "train.json"), cutoff_len=64, val_size=8, eval_batch_size=8)
    c.train.update(steps=3, batch_size=8, eval_every=3, progress_bar=False, warmup_steps=1)
    c.checkpoint.async_save = False
    train.train_and_evaluate(c, root / "run")
    return root, tokenizer


def test_evaluation_writes_per_task_accuracy_tables(trained_run):
    root, _ = trained_run
    results = evaluate.evaluate_run(root / "run", root / "data")
    assert results["boolq"]["records"] == 5 and results["winogrande"]["records"] == 3
    assert all(0.0 <= results[t]["accuracy"] <= 1.0 for t in ("boolq", "winogrande", "average"))
    table = (root / "run" / "eval" / "commonsense.md").read_text()
    assert "| boolq |" in table and "| winogrande |" in table and "| average |" in table
    stored = json.loads((root / "run" / "eval" / "commonsense.json").read_text())
    assert stored["results"]["boolq"]["correct"] == results["boolq"]["correct"] and stored["step"] == 3


def test_batched_scores_equal_scoring_each_candidate_alone(trained_run):
    root, tokenizer = trained_run
    run = runs.load(root / "run")
    forward, trainable = runs.make_forward(run.model, run.adapter_cfg), run.trainable
    score = jax.jit(lambda b: metrics.sequence_logprobs(forward(trainable, run.frozen, b, None), b))
    batched = scoring.score_records(BOOLQ, "boolq", tokenizer, score, 64, batch_size=4)
    alone = scoring.score_records(BOOLQ, "boolq", tokenizer, score, 64, batch_size=1)
    assert batched == alone and set(batched) <= {"true", "false"}
    ids, scored = scoring.candidate_rows(BOOLQ[0], "boolq", tokenizer, 64)[0]
    logits = forward(trainable, run.frozen, {"inputs": jnp.asarray(ids[None, :-1])}, None)[0]
    direct = jax.nn.log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]][scored[1:]].sum()
    rows = pack_rows([(ids, scored)], 63)
    np.testing.assert_allclose(score(rows)[0], direct, rtol=1e-5)
    assert scored.sum() == len("the correct answer is true".split())


def test_unknown_task_and_empty_data_dir_are_named(trained_run, tmp_path):
    root, _ = trained_run
    with pytest.raises(ConfigError, match=r"--tasks \['boolqq'\] are unknown; tasks: \['boolq'"):
        evaluate.evaluate_run(root / "run", root / "data", tasks=["boolqq"])
    with pytest.raises(ConfigError, match=r"holds no <task>/test.json"):
        evaluate.evaluate_run(root / "run", tmp_path)


def test_choices_come_from_the_answer_format_line():
    assert cs.choices(BOOLQ[0], "boolq") == ["true", "false"]
    assert cs.choices({"instruction": "no format line"}, "winogrande") == ["option1", "option2"]


def test_greedy_generation_scores_the_first_answer_word_of_the_decoded_text(trained_run):
    root, tokenizer = trained_run
    results = evaluate.evaluate_run(root / "run", root / "data", tasks=["boolq"], batch_size=4, method="greedy")
    assert results["boolq"]["records"] == 5 and 0.0 <= results["boolq"]["accuracy"] <= 1.0
    assert json.loads((root / "run" / "eval" / "commonsense.json").read_text())["method"] == "greedy"
    run = runs.load(root / "run")
    forward, params = runs.lm_forward(run.model, run.adapter_cfg), (run.frozen, run.trainable)
    answers, texts = scoring.generate_answers(BOOLQ, "boolq", tokenizer, forward, params, run.model.config, 4)
    assert len(texts) == 5 and answers == [cs.extract_answer("boolq", t) for t in texts]
    assert results["boolq"]["correct"] == sum(a == r["answer"] for a, r in zip(answers, BOOLQ, strict=True))


def test_beam_search_evaluation_with_one_beam_matches_greedy(trained_run):
    root, tokenizer = trained_run
    run = runs.load(root / "run")
    forward, params = runs.lm_forward(run.model, run.adapter_cfg), (run.frozen, run.trainable)
    greedy = scoring.generate_answers(BOOLQ, "boolq", tokenizer, forward, params, run.model.config, 4, 6)
    beam = scoring.generate_answers(BOOLQ, "boolq", tokenizer, forward, params, run.model.config, 4, 6, num_beams=1)
    assert beam == greedy
    results = evaluate.evaluate_run(root / "run", root / "data", tasks=["winogrande"], batch_size=4, method="beam")
    assert results["winogrande"]["records"] == 3
    assert "beam search with 4 beams" in (root / "run" / "eval" / "commonsense.md").read_text()


def test_unknown_method_is_named(trained_run):
    root, _ = trained_run
    expected = r"--method: expected one of \('loglik', 'greedy', 'beam', 'perplexity'\); got 'sample'"
    with pytest.raises(ConfigError, match=expected):
        evaluate.evaluate_run(root / "run", root / "data", method="sample")


def test_perplexity_is_exp_of_the_mean_nll_of_the_trained_response_tokens(trained_run):
    root, tokenizer = trained_run
    results = evaluate.evaluate_run(root / "run", root / "data", tasks=["boolq"], batch_size=4, method="perplexity")
    run = runs.load(root / "run")
    forward, trainable = runs.make_forward(run.model, run.adapter_cfg), run.trainable
    nll = tokens = 0.0
    for ids, trained in encode_all(BOOLQ, tokenizer, 64, 2, train_on_inputs=False):
        logits = forward(trainable, run.frozen, {"inputs": jnp.asarray(ids[None, :-1])}, None)[0]
        log_probs = jax.nn.log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]]
        nll, tokens = nll - float(log_probs[trained[1:]].sum()), tokens + trained[1:].sum()
    assert results["boolq"]["tokens"] == tokens == 5 * len("the correct answer is true </s>".split())
    np.testing.assert_allclose(results["boolq"]["perplexity"], np.exp(nll / tokens), rtol=1e-5)
    assert "| boolq |" in (root / "run" / "eval" / "commonsense.md").read_text()


def test_tfds_split_is_scored_as_its_commonsense_task(trained_run, piqa_dir):  # noqa: F811
    root, _ = trained_run
    results = evaluate.evaluate_run(root / "run", tfds_names=["piqa"], tfds_split="train", tfds_data_dir=str(piqa_dir))
    assert list(results) == ["piqa", "average"] and results["piqa"]["records"] == 24


def test_evaluation_needs_files_or_tfds(trained_run):
    root, _ = trained_run
    with pytest.raises(ConfigError, match=r"give --data_dir \(files <task>/test.json\) or --tfds"):
        evaluate.evaluate_run(root / "run")


def test_a_peft_adapter_scores_like_the_run_it_came_from(trained_run, tmp_path):
    root, _ = trained_run
    from_run = evaluate.evaluate_run(root / "run", root / "data", batch_size=4)
    from_adapter = evaluate.evaluate_run(
        tmp_path / "out", root / "data", batch_size=4, adapter_dir=root / "run" / "adapter", base_dir=root / "base"
    )
    assert from_adapter == from_run
    assert json.loads((tmp_path / "out" / "eval" / "commonsense.json").read_text())["step"] == 0
    with pytest.raises(ConfigError, match=r"--adapter needs --base"):
        evaluate.evaluate_run(tmp_path / "out", root / "data", adapter_dir=root / "run" / "adapter")
