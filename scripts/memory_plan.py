"""Will this run fit? The per-device memory of a run's real train step, compiled on shapes alone.

    python -m scripts.memory_plan --config=configs/commonsense.py:llama7b_dora_r32 \\
        --config.model.hf_dir=configs/hf/llama-7b --devices=8 --device_memory=80GiB
    python -m scripts.memory_plan --config=configs/default.py --json --markdown=plans.md

It builds the train step ``dora_jax.train`` would run for the config (the same model, adapters,
optimizer, shardings, remat and batch) on ``jax.ShapeDtypeStruct`` parameters: the base model's
``config.json`` is all it reads (a directory holding only that file will do; the random base needs
nothing), no weight is read or allocated and no data file opened. It lowers and compiles the step
for the config's mesh over ``--devices`` (forced host devices on CPU; the mesh's -1 axis takes what
is left) and prints, per device, XLA's ``memory_analysis()`` (arguments: parameters, adapters,
optimizer state and the batch; outputs; temporaries; the donated state aliased) and the compiled
FLOPs per step (``cost_analysis()``, one device's program). ``peak_bytes`` = arguments + outputs +
temporaries - aliased; with ``--device_memory`` it says whether that fits; ``--markdown=FILE`` appends
the plan as a row to a table (the header when FILE is new or empty). XLA:CPU's buffer
assignment is not a GPU's or TPU's: on CPU the figures are the CPU compiler's (the argument bytes exact
on any backend); on a GPU they are the GPU compiler's.
"""

from __future__ import annotations

import os
import re
import sys


def _devices_flag(argv: list[str]) -> int:
    """``--devices`` read before JAX starts: the forced host device count has to be set first."""
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 1


if __name__ == "__main__":
    _count = _devices_flag(sys.argv[1:])
    if _count > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_count}"

import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from dora_jax import data as data_lib  # noqa: E402
from dora_jax import metrics as metrics_lib  # noqa: E402
from dora_jax import models, optim, parallel, run_config, runs, train  # noqa: E402
from dora_jax.errors import ConfigError, DoraError  # noqa: E402

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"24GB"``, ``"40e9"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--device_memory={text!r}: expected a number with an optional unit, e.g. 80GiB or 24GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def sequence_length(config: ml_collections.ConfigDict) -> int:
    """Tokens per training row, as the run's data source makes them (the synthetic task: its own)."""
    source = config.data.source
    if source == "synthetic":
        return data_lib.make_source(config).seq_len
    return config.data.cutoff_len if source == "classification" else config.data.cutoff_len - 1


def abstract_batch(
    config: ml_collections.ConfigDict, model: Any, length: int, sharding: Any
) -> dict[str, jax.ShapeDtypeStruct]:
    """One training batch's shapes (rows of ``length`` tokens): next-token rows for a causal LM, a
    classifier's rows otherwise."""
    rows = config.train.batch_size

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    if config.data.source == "classification":
        batch = {k: spec((rows, length), jnp.int32) for k in ("inputs", *models.family(model).inputs)}
        return batch | {"labels": spec((rows,), jnp.int32), "loss_mask": spec((rows,), jnp.float32)}
    tokens = {k: spec((rows, length), jnp.int32) for k in ("inputs", "targets")}
    return tokens | {"loss_mask": spec((rows, length), jnp.float32)}


def abstract_step(config: ml_collections.ConfigDict) -> tuple[Any, tuple[Any, ...], runs.LoadedRun, int]:
    """(jitted train step, its abstract arguments, the abstract run, tokens per row) for ``config``:
    what ``dora_jax.train`` would compile, on shapes alone."""
    run = runs.place_abstract(config)
    tx = optim.make_optimizer(config.train, run.trainable)
    classify = config.data.source == "classification"
    step, state_sharding = train.jit_train_step(
        run, tx, metrics_lib.classification_metrics if classify else metrics_lib.lm_metrics
    )
    state = runs.abstract(jax.eval_shape(functools.partial(optim.init_state, tx), run.trainable), state_sharding)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(run.mesh))
    length = sequence_length(config)
    batch = abstract_batch(config, run.model, length, run.batch_sharding)
    return step, (state, run.frozen, batch, rng), run, length


def plan(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The compiled train step's per-device memory and FLOPs for ``config`` on the available devices."""
    step, arguments, run, length = abstract_step(config)
    compiled = step.lower(*arguments).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    out = {
        "platform": jax.devices()[0].platform,
        "devices": run.mesh.size,
        "mesh": dict(run.mesh.shape),
        "method": run_config.method_name(config),
        "quantize": config.model.quantize,
        "remat": config.model.remat,
        "scan_layers": config.model.scan_layers,
        "batch": [config.train.batch_size, length],
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def gib(count: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"


def report(figures: dict[str, Any], device_memory: int | None) -> str:
    lines = [
        f"{figures['method']} on {figures['devices']} device(s), mesh {figures['mesh']}, batch "
        f"{figures['batch'][0]} x {figures['batch'][1]} tokens; per device:",
        f"  arguments    {gib(figures['argument_bytes'])} (parameters, adapters, optimizer state, batch)",
        f"  outputs      {gib(figures['output_bytes'])} ({gib(figures['alias_bytes'])} of them aliased to arguments)",
        f"  temporaries  {gib(figures['temp_bytes'])}",
        f"  peak         {gib(figures['peak_bytes'])}",
        f"  compiled FLOPs per step {figures['flops']:.3e}",
    ]
    if device_memory is not None:
        verdict = "fits" if figures["peak_bytes"] <= device_memory else "does not fit"
        lines.append(f"  {verdict} in {gib(device_memory)} per device")
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| platform | devices | method | quantize | remat | scanned | batch | arguments | temporaries | peak |\n"
    "|---|---:|---|---|---|---|---|---:|---:|---:|\n"
)


def markdown_row(figures: dict[str, Any]) -> str:
    """One row of the plans table (``MARKDOWN_HEADER``), sizes in GiB."""
    batch = "{} x {}".format(*figures["batch"])
    sizes = " | ".join(f"{figures[key] / 2**30:.2f}" for key in ("argument_bytes", "temp_bytes", "peak_bytes"))
    return (
        f"| {figures['platform']} | {figures['devices']} | {figures['method']} | {figures['quantize']} | "
        f"{figures['remat']} | {'yes' if figures['scan_layers'] else 'no'} | {batch} | {sizes} |\n"
    )


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.")
    flags.DEFINE_integer("devices", 1, "devices to plan for (forced host devices on CPU)")
    memory_flag = flags.DEFINE_string("device_memory", None, "memory of one device, e.g. 80GiB: says whether it fits")
    json_flag = flags.DEFINE_bool("json", False, "print the figures as one JSON object")
    markdown_flag = flags.DEFINE_string("markdown", None, "also append the plan as a row to this markdown table")

    def parse(args):
        return run_config.parse_flags(flags.FLAGS, args, "scripts.memory_plan")

    def run(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        config = run_config.loaded(config_flag.value, "scripts.memory_plan")
        try:
            if jax.device_count() != flags.FLAGS.devices:
                raise ConfigError(
                    f"--devices={flags.FLAGS.devices} but JAX sees {jax.device_count()} {jax.devices()[0].platform} "
                    "device(s): on CPU the count is forced before JAX starts (run this module as a script)"
                )
            device_memory = None if memory_flag.value is None else parse_bytes(memory_flag.value)
            figures = plan(config)
        except DoraError as err:
            sys.exit(f"scripts.memory_plan: {err}")
        if device_memory is not None:
            figures["fits"] = figures["peak_bytes"] <= device_memory
        print(json.dumps(figures) if json_flag.value else report(figures, device_memory), flush=True)
        if markdown_flag.value:
            table = pathlib.Path(markdown_flag.value)
            with table.open("a") as f:
                f.write(("" if table.exists() and table.stat().st_size else MARKDOWN_HEADER) + markdown_row(figures))

    app.run(run, argv=argv, flags_parser=parse)


if __name__ == "__main__":
    main()
