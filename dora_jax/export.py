"""Export a training run: ``python -m dora_jax.export --workdir=RUN --format=peft|merged --out=DIR``.

Reads the run's ``config.json`` and its latest checkpoint, and writes the adapter as a PEFT
directory (``peft``) or the adapted model as a plain HF directory with DoRA folded into the
kernels (``merged``; for full fine-tuning, the fine-tuned model).
"""

from __future__ import annotations

import pathlib
import sys

from dora_jax import runs
from dora_jax.errors import ConfigError, DoraError
from dora_jax.runs import FORMATS


def export_run(workdir: str | pathlib.Path, fmt: str, out: str | pathlib.Path) -> pathlib.Path:
    """Writes the run in ``workdir`` (its latest checkpoint) to ``out`` in format ``fmt``."""
    workdir = pathlib.Path(workdir)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {FORMATS}; got {fmt!r}")
    run = runs.load(workdir)
    if run.adapter_cfg is None and fmt == "peft":
        raise ConfigError(f"{workdir} is a full fine-tuning run: it has no adapter; use --format=merged")
    return run.export(fmt, out)


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    workdir = flags.DEFINE_string("workdir", None, "The --workdir of a dora_jax.train run.", required=True)
    fmt = flags.DEFINE_enum("format", "peft", list(FORMATS), "peft: adapter directory; merged: HF model.")
    out = flags.DEFINE_string("out", None, "Directory to write.", required=True)

    def run(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            path = export_run(workdir.value, fmt.value, out.value)
        except DoraError as err:
            sys.exit(f"dora_jax.export: {err}")
        print(f"wrote {fmt.value} export of {workdir.value} to {path}")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
