"""Batches per second of a config's input pipeline alone (host side, no device work).

    python -m scripts.data_throughput --config=configs/default.py [--batches 200] [--config.KEY=VALUE ...]

Compare with the train step's rate (``train/tokens_per_s`` in a run's metrics.jsonl, or steps/s
on the progress bar): the pipeline keeps up when its batches/s is well above steps/s.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags

from dora_jax import data as data_lib


def throughput(config, batches: int) -> dict[str, float]:
    source = data_lib.make_source(config)
    source.batch(0, config.train.batch_size)  # first-call costs (tokeniser warm-up) stay out of the timing
    start = time.perf_counter()
    for index in range(1, batches + 1):
        source.batch(index, config.train.batch_size)
    elapsed = time.perf_counter() - start
    return {
        "batches_per_s": batches / elapsed,
        "tokens_per_s": batches * config.train.batch_size * source.seq_len / elapsed,
    }


def main() -> None:
    config = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
    batches = flags.DEFINE_integer("batches", 200, "Batches to build.")

    def run(_):
        figures = throughput(config.value, batches.value)
        print(
            f"{config.value.data.source} pipeline: {figures['batches_per_s']:,.0f} batches/s "
            f"({figures['tokens_per_s']:,.0f} tokens/s) at batch {config.value.train.batch_size}"
        )

    app.run(run, argv=sys.argv)


if __name__ == "__main__":
    main()
