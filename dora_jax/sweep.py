"""Sweeps: ``python -m dora_jax.sweep --config=configs/sweeps/NAME.py --workdir=DIR``.

A sweep file is a config file with two functions: ``get_config()`` returns the base run config
(what ``dora_jax.train`` takes) and ``get_sweep()`` a list of points, each a dict of dotted
overrides (``{"adapter.rank": 4, "seed": 0}``), built with ``product`` and ``zip``. Every point
trains through ``train.train_and_evaluate`` in ``DIR/<its overrides>``: a finished point is
skipped, an interrupted one resumes from its checkpoint, a failed one is recorded
(``DIR/<point>/error.txt``) and the sweep goes on. ``--list`` prints one ``dora_jax.train``
command per point and ``--point=K`` runs point K alone (a scheduler's job array); ``--report``
(also run at the end) writes ``results.csv``, ``results.md`` and ``plots/`` (``sweep_report``).
"""

from __future__ import annotations

import builtins
import copy
import importlib.util
import itertools
import json
import pathlib
import re
import shlex
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dora_jax import run_config
from dora_jax.errors import ConfigError, DoraError

Point = dict[str, Any]
SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")  # characters a point's directory name keeps


def _points(part: Sequence[Point] | Mapping[str, Sequence[Any]]) -> list[Point]:
    """A list of points, or a dict {key: values} read as the product of its keys' values."""
    if isinstance(part, Mapping):
        keys = list(part)
        return [dict(builtins.zip(keys, values, strict=True)) for values in itertools.product(*part.values())]
    return [dict(point) for point in part]


def product(*parts: Sequence[Point] | Mapping[str, Sequence[Any]]) -> list[Point]:
    """Every combination of the parts' points, the first part varying slowest:
    ``product({"adapter.method": ["lora", "dora"]}, {"seed": [0, 1]})`` has 4 points."""
    out: list[Point] = [{}]
    for part in parts:
        out = [{**left, **right} for left in out for right in _points(part)]
    return out


def zip(*parts: Sequence[Point] | Mapping[str, Sequence[Any]]) -> list[Point]:  # noqa: A001 (big_vision's name)
    """The parts' points side by side (equal lengths): ``zip({"adapter.rank": [4, 8]},
    {"adapter.alpha": [8.0, 16.0]})`` has 2 points, each with both keys."""
    lists = [_points(part) for part in parts]
    if len({len(points) for points in lists}) > 1:
        raise ConfigError(f"sweep.zip: the parts have different lengths {[len(points) for points in lists]}")
    return [{k: v for point in row for k, v in point.items()} for row in builtins.zip(*lists, strict=True)]


def point_name(point: Point) -> str:
    """The directory name of a point: its overrides as ``key=value`` joined by commas, filesystem-safe."""
    name = ",".join(f"{key}={_text(value)}" for key, value in point.items())
    return SAFE.sub("_", name)[:200] or "base"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def load(path: str, overrides: Point | None = None) -> tuple[ml_collections.ConfigDict, list[Point]]:
    """(base config, points) of a sweep file, the base with ``overrides`` (dotted keys, as
    ``--config.KEY=VALUE`` gives them); ``path`` may end in ``:ARG``, passed to both functions."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("dora_jax_sweep_file", file)
    if spec is None or not pathlib.Path(file).is_file():
        raise ConfigError(f"--config {file}: no such sweep file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("get_config", "get_sweep"):
        if not hasattr(module, name):
            raise ConfigError(f"{file} has no {name}(): a sweep file defines get_config() and get_sweep()")
    args = (arg,) if arg else ()
    return point_config(module.get_config(*args), overrides or {}, "--config"), list(module.get_sweep(*args))


def point_config(base: ml_collections.ConfigDict, point: Point, index: int | str = 0) -> ml_collections.ConfigDict:
    """``base`` with the point's overrides; a key the schema lacks is a ConfigError naming the point."""
    valid = run_config.flat(run_config.defaults())
    config = copy.deepcopy(base)
    where = index if isinstance(index, str) else f"sweep point {index} ({point_name(point)})"
    for key, value in point.items():
        run_config.check_key(key, valid, f"{where}: key")
        run_config.set_value(config, key, value)
    return config


def check(base: ml_collections.ConfigDict, points: list[Point]) -> list[ml_collections.ConfigDict]:
    """Every point's config, each checked (``run_config.check``, no ``<placeholder>`` left) before
    anything runs; point names must differ."""
    names = [point_name(point) for point in points]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"sweep points share a directory name (the same overrides?): {repeated[:3]}")
    configs = []
    for index, point in enumerate(points):
        config = point_config(base, point, index)
        try:
            run_config.check(config)
        except ConfigError as err:
            raise ConfigError(f"sweep point {index} ({names[index]}): {err}") from None
        unset = run_config.placeholders(config)
        if unset:
            flags = " ".join(f"--config.{key}=..." for key in unset)
            raise ConfigError(f"sweep point {index} ({names[index]}): {unset} not set (placeholders); pass {flags}")
        configs.append(config)
    return configs


def command(sweep_file: str, workdir: pathlib.Path, point: Point, overrides: Point | None = None) -> str:
    """The ``dora_jax.train`` command line that trains ``point`` exactly as the sweep does."""
    parts = ["python", "-m", "dora_jax.train", f"--config={sweep_file}", f"--workdir={workdir / point_name(point)}"]
    parts += [f"--config.{key}={_flag(value)}" for key, value in {**(overrides or {}), **point}.items()]
    return " ".join(shlex.quote(part) for part in parts)


def _flag(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def record(workdir: pathlib.Path, sweep_file: str, points: list[Point], overrides: Point | None = None) -> None:
    """Writes ``DIR/sweep.json`` (the file, its base overrides and the points, in order), refusing a
    DIR that holds another sweep (other points; other base settings are caught per point)."""
    path = workdir / "sweep.json"
    current = {"config": sweep_file, "overrides": overrides or {}, "points": json.loads(json.dumps(points))}
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["points"] != current["points"]:
            raise ConfigError(f"{workdir} holds another sweep ({stored['config']}); use a new --workdir")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2))


def finished(directory: pathlib.Path) -> bool:
    """Whether a point's run finished (its summary holds the final evaluation)."""
    path = directory / "summary.json"
    return path.exists() and "after" in json.loads(path.read_text())


def run_point(config: ml_collections.ConfigDict, directory: pathlib.Path) -> str:
    """Trains (or resumes) one point; "done", "skipped" (finished before) or "failed" (error.txt written)."""
    from dora_jax import train

    if finished(directory):
        return "skipped"
    error = directory / "error.txt"
    try:
        train.train_and_evaluate(config, directory)
    except Exception:  # noqa: BLE001 (a failed point is recorded and the sweep goes on)
        directory.mkdir(parents=True, exist_ok=True)
        error.write_text(traceback.format_exc())
        print(f"point {directory.name} failed; see {error}", flush=True)
        return "failed"
    error.unlink(missing_ok=True)
    return "done" if finished(directory) else "stopped"


def run(
    sweep_file: str,
    workdir: str | pathlib.Path,
    point: int | None = None,
    overrides: Point | None = None,
    report: bool = True,
) -> dict[str, str]:
    """Runs the sweep (or its point ``point``) in ``workdir``, its base config with ``overrides``;
    returns {point name: status}."""
    workdir = pathlib.Path(workdir)
    base, points = load(sweep_file, overrides)
    configs = check(base, points)
    if point is not None and not 0 <= point < len(points):
        raise ConfigError(f"--point={point}: the sweep has points 0..{len(points) - 1}")
    record(workdir, sweep_file, points, overrides)
    chosen = range(len(points)) if point is None else [point]
    statuses = {}
    for index in chosen:
        name = point_name(points[index])
        print(f"sweep point {index + 1}/{len(points)}: {name}", flush=True)
        statuses[name] = run_point(configs[index], workdir / name)
    if report and point is None:
        from dora_jax import sweep_report

        sweep_report.write(workdir)
    return statuses


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    # The sweep file is read by load() (get_sweep as well as get_config); the flag gives its path and overrides.
    config_flags.DEFINE_config_file("config", None, "Sweep file (get_config and get_sweep), optionally :ARG.")
    workdir = flags.DEFINE_string("workdir", None, "Directory of the sweep: one sub-directory per point.")
    listing = flags.DEFINE_boolean("list", False, "Print one dora_jax.train command per point and exit.")
    point = flags.DEFINE_integer("point", None, "Run point K alone (0-based), e.g. $SLURM_ARRAY_TASK_ID.")
    report = flags.DEFINE_boolean("report", False, "Only gather the points' results into tables and plots.")
    flags.mark_flags_as_required(["config", "workdir"])

    def body(_):
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            if report.value:
                from dora_jax import sweep_report

                print(sweep_report.write(pathlib.Path(workdir.value)).read_text())
                return
            path = config_flags.get_config_filename(flags.FLAGS["config"])
            overrides = config_flags.get_override_values(flags.FLAGS["config"])
            base, points = load(path, overrides)
            check(base, points)
            if listing.value:
                print("\n".join(command(path, pathlib.Path(workdir.value), p, overrides) for p in points))
                return
            statuses = run(path, workdir.value, point.value, overrides)
        except DoraError as err:
            sys.exit(f"dora_jax.sweep: {err}")
        failed = sum(status == "failed" for status in statuses.values())
        print(f"sweep: {len(statuses)} points run, {failed} failed", flush=True)
        sys.exit(min(failed, 125))

    app.run(body, argv=argv, flags_parser=lambda args: run_config.parse_flags(flags.FLAGS, args, "dora_jax.sweep"))


if __name__ == "__main__":
    main()
