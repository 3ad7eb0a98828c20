"""Commonsense scoring, given a scoring function: likelihood ranking, generation, perplexity.

Pure of any run: each function takes the tokenizer and a jitted function of a batch
(``LoadedRun.scorer``) or a decoding forward (``runs.lm_forward``), so that ``evaluate`` and the
notebooks score any model the same way.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from dora_jax import generate
from dora_jax.data import commonsense, sampling
from dora_jax.data.instruction import NO_LOSS_ROW, encode_all, pack_rows

RESPONSE = "the correct answer is {}"


def candidate_rows(
    record: dict[str, str], task: str, tokenizer: Any, cutoff_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, scored flags) of the prompt followed by each candidate response, keeping the last tokens."""
    prompt = commonsense.prompt(record)
    prompt_len = len(tokenizer.encode(prompt).ids)
    rows = []
    for choice in commonsense.choices(record, task):
        ids = np.asarray(tokenizer.encode(prompt + RESPONSE.format(choice)).ids, np.int32)
        scored = np.arange(len(ids)) >= prompt_len
        rows.append((ids[-cutoff_len:], scored[-cutoff_len:]))
    return rows


def score_records(
    records: list[dict[str, str]], task: str, tokenizer: Any, score_fn: Any, cutoff_len: int, batch_size: int
) -> list[str]:
    """The predicted answer of each record: the candidate with the highest log-likelihood."""
    rows, owners = [], []
    for index, record in enumerate(records):
        for row in candidate_rows(record, task, tokenizer, cutoff_len):
            rows.append(row)
            owners.append(index)
    scores = []
    for chunk in sampling.chunks(rows, batch_size, NO_LOSS_ROW):
        scores.extend(np.asarray(score_fn(pack_rows(chunk, cutoff_len - 1))).tolist())
    scores = scores[: len(rows)]  # without the filler rows of the last batch
    predictions = []
    for index, record in enumerate(records):
        options = commonsense.choices(record, task)
        mine = [s for s, owner in zip(scores, owners, strict=True) if owner == index]
        predictions.append(options[int(np.argmax(mine))])
    return predictions


def generate_answers(
    records: list[dict[str, str]],
    task: str,
    tokenizer: Any,
    forward: Any,
    params: Any,
    config: Any,
    batch_size: int,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    eos_id: int | None = None,
) -> tuple[list[str], list[str]]:
    """(answers, generated texts): decoding after the evaluation prompt, then ``extract_answer``.

    ``forward(params, ids, **kw)`` as ``generate`` takes it (``lm_forward``); every batch reuses
    one compiled decoding loop.

    ``num_beams=1`` decodes greedily; more runs beam search (the official setting is 4 beams,
    32 new tokens).

    Prompts are left-padded to a multiple of 64 tokens so that few shapes are compiled.
    """
    texts = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encoded = [tokenizer.encode(commonsense.prompt(r)).ids for r in chunk]
        width = -(-max(len(e) for e in encoded) // 64) * 64
        ids = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :], mask[row, width - len(tokens) :] = tokens, 1
        mask[len(chunk) :, -1] = 1  # filler rows attend to one token
        if num_beams == 1:
            new = generate.greedy(forward, params, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens)
        else:
            new, _ = generate.beam_search(
                forward, params, config, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens, num_beams, eos_id
            )
        texts += [tokenizer.decode(np.asarray(row).tolist(), skip_special_tokens=True) for row in new[: len(chunk)]]
    return [commonsense.extract_answer(task, commonsense.response(t)) for t in texts], texts


def perplexity_sums(
    records: list[dict[str, str]], tokenizer: Any, eval_fn: Any, config: Any, eos_id: int | None, batch_size: int
) -> dict[str, float]:
    """Summed NLL and token count of the records' training texts, on the tokens the run trains on."""
    encoded = encode_all(records, tokenizer, config.data.cutoff_len, eos_id, config.data.train_on_inputs)
    nll = tokens = 0.0
    for chunk in sampling.chunks(encoded, batch_size, NO_LOSS_ROW):
        sums = eval_fn(pack_rows(chunk, config.data.cutoff_len - 1))
        nll, tokens = nll + float(sums["loss_sum"]), tokens + float(sums["tokens"])
    return {"nll": nll, "tokens": tokens}
