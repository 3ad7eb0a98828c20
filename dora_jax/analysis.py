"""The paper's weight-decomposition analysis (§3.2, Fig. 2): how magnitude and direction move.

For a kernel viewed as (d_in, d_out) (Flax: the input axes are contracted, so a column is one
output feature), with W0 the base kernel and Wt the kernel at a saved step (the merged kernel for
LoRA and DoRA, the trained one for full fine-tuning), both over the same k columns:

    ΔM_t = mean_n | ‖Wt[:, n]‖ − ‖W0[:, n]‖ |        ΔD_t = mean_n (1 − cos(Wt[:, n], W0[:, n]))

The paper reads the sign of the relation between ΔD and ΔM over layers and steps: full
fine-tuning and DoRA move them in opposite directions (negative slope), LoRA together (positive).

    python -m dora_jax.analysis --workdirs RUN [RUN ...] [--targets REGEX] [--out DIR]

reads each run's base model and every kept checkpoint (``checkpoint.keep_period`` keeps the
snapshots; a sweep directory stands for all its points) and writes ``analysis.csv``,
``analysis.md`` (slope and correlation per method) and one Fig.-2-style scatter per method.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
import sys
from typing import Any

import jax
import numpy as np

from dora_jax import run_config, runs, targets
from dora_jax.core import kernel_layout
from dora_jax.errors import ConfigError, DoraError
from dora_jax.io import checkpoints

DEFAULT_TARGETS = r".*/(q_proj|v_proj|query|value)/kernel"  # the paper's query and value projections
COLUMNS = ("run", "method", "step", "layer", "delta_m", "delta_d")


def kernel_changes(w0: Any, wt: Any, input_axes: tuple[int, ...] = (0,)) -> tuple[float, float]:
    """(ΔM, ΔD) of a kernel ``wt`` against its base ``w0``, per output column, in float64."""
    layout = kernel_layout(np.shape(w0), input_axes)

    def matrix(kernel: Any) -> np.ndarray:  # the layout's (d_in, d_out) view, in numpy: float64 kept
        return np.transpose(np.asarray(kernel, np.float64), layout.permutation).reshape(layout.d_in, layout.d_out)

    base, now = matrix(w0), matrix(wt)
    base_norm, now_norm = np.linalg.norm(base, axis=0), np.linalg.norm(now, axis=0)
    cosine = (base * now).sum(0) / np.maximum(base_norm * now_norm, np.finfo(np.float64).tiny)
    return float(np.mean(np.abs(now_norm - base_norm))), float(np.mean(1.0 - cosine))


def fit(delta_d: Any, delta_m: Any) -> dict[str, float]:
    """Least-squares line ΔM = slope·ΔD + intercept and the Pearson correlation of ΔD and ΔM."""
    x, y = np.asarray(delta_d, np.float64), np.asarray(delta_m, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return {"slope": float("nan"), "intercept": float("nan"), "correlation": float("nan"), "points": len(x)}
    slope, intercept = np.polyfit(x, y, 1)
    correlation = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else float("nan")
    return {"slope": float(slope), "intercept": float(intercept), "correlation": correlation, "points": len(x)}


def layer_changes(base: Any, current: Any, pattern: str, input_axes: Any = None) -> dict[str, tuple[float, float]]:
    """{kernel path: (ΔM, ΔD)} for every leaf of ``base`` whose '/'-joined path matches ``pattern``;
    ``input_axes(path, shape)`` gives a kernel's contracted axes (default: the first)."""
    regex = re.compile(pattern)
    found = {targets.path_str(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(base)}
    now = {targets.path_str(kp): leaf for kp, leaf in jax.tree_util.tree_leaves_with_path(current)}
    out = {}
    for path, w0 in found.items():
        if regex.fullmatch(path):
            axes = input_axes(path, np.shape(w0)) if input_axes else (0,)
            out[path] = kernel_changes(w0, now[path], axes)
    if not out:
        raise ConfigError(f"--targets {pattern!r} matches no kernel; kernels: {sorted(found)[:8]} ...")
    return out


def run_dirs(workdirs: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """The run directories given, a sweep directory standing for its points that have a config."""
    out = []
    for workdir in map(pathlib.Path, workdirs):
        if (workdir / "sweep.json").exists():
            out += sorted(p for p in workdir.iterdir() if (p / "config.json").exists())
        elif (workdir / "config.json").exists():
            out.append(workdir)
        else:
            raise ConfigError(f"{workdir}: neither a dora_jax.train run (config.json) nor a sweep (sweep.json)")
    return out


def run_rows(workdir: pathlib.Path, pattern: str) -> list[dict[str, Any]]:
    """One row per (kept step, targeted kernel) of the run in ``workdir``."""
    run = runs.place(runs.read_config(workdir))
    method = run_config.method_name(run.config)
    base = run.params()
    directory = workdir / "checkpoints"
    steps = checkpoints.all_steps(directory)
    if not steps:
        raise ConfigError(f"{directory}: no checkpoint to analyse")
    axes = run.adapter_cfg.axes_for if run.adapter_cfg is not None else None
    shapes = runs.abstract(run.trainable, run.trainable_sharding)
    rows = []
    for step in steps:
        run.trainable = checkpoints.restore_trainable(directory, step, shapes)
        for layer, (delta_m, delta_d) in layer_changes(base, run.merged_params(), pattern, axes).items():
            rows.append(dict(run=workdir.name, method=method, step=step, layer=layer, delta_m=delta_m, delta_d=delta_d))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Weight decomposition: least-squares slope of ΔM against ΔD and their Pearson correlation, per method",
        "(every kept step of every run and targeted kernel is one point).",
        "",
        "| method | runs | points | slope | correlation |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        stats = fit([r["delta_d"] for r in mine], [r["delta_m"] for r in mine])
        count = len({row["run"] for row in mine})
        lines.append(f"| {method} | {count} | {stats['points']} | {stats['slope']:.4g} | {stats['correlation']:.3f} |")
    return "\n".join(lines) + "\n"


def draw(ax: Any, method: str, rows: list[dict[str, Any]]) -> None:
    """Fig. 2 of ``rows`` (one method) on a matplotlib axis: ΔD on x, ΔM on y, a colour per layer, a
    marker per step, the fitted line with its slope and r."""
    import matplotlib

    layers = list(dict.fromkeys(row["layer"] for row in rows))
    steps = sorted({row["step"] for row in rows})
    markers = "os^Dv<>pP*Xh"
    colours = matplotlib.colormaps["tab10" if len(layers) <= 10 else "tab20"]
    for row in rows:
        ax.scatter(
            row["delta_d"],
            row["delta_m"],
            color=colours(layers.index(row["layer"]) % colours.N),
            marker=markers[steps.index(row["step"]) % len(markers)],
            s=22,
        )
    stats = fit([r["delta_d"] for r in rows], [r["delta_m"] for r in rows])
    if np.isfinite(stats["slope"]):
        xs = np.linspace(min(r["delta_d"] for r in rows), max(r["delta_d"] for r in rows), 50)
        label = f"fit: slope {stats['slope']:.3g}, r = {stats['correlation']:.2f}"
        ax.plot(xs, stats["slope"] * xs + stats["intercept"], "k--", lw=1, label=label)
    for index, layer in enumerate(layers[:12]):
        ax.scatter([], [], color=colours(index % colours.N), marker="o", s=14, label=layer.removesuffix("/kernel"))
    for index, step in enumerate(steps[:6]):
        ax.scatter([], [], color="grey", marker=markers[index % len(markers)], s=14, label=f"step {step}")
    ax.set_xlabel("ΔD (mean 1 − cos per column)")
    ax.set_ylabel("ΔM (mean |Δ column norm|)")
    ax.set_title(f"{method}: magnitude vs direction change")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)


def scatter(path: pathlib.Path, method: str, rows: list[dict[str, Any]]) -> None:
    """Writes ``draw``'s figure of one method to ``path``: a bare Figure, no pyplot, so it needs no
    display and leaves the caller's backend (a notebook's inline plots) alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    draw(fig.subplots(), method, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def analyse(workdirs: list[str | pathlib.Path], pattern: str = DEFAULT_TARGETS, out: Any = None) -> pathlib.Path:
    """Writes analysis.csv, analysis.md and fig2_<method>.png for ``workdirs`` to ``out`` (default:
    the first workdir); returns analysis.md."""
    directories = run_dirs(workdirs)
    out = pathlib.Path(out or workdirs[0])
    rows = [row for directory in directories for row in run_rows(directory, pattern)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "analysis.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "analysis.md").write_text(markdown(rows))
    for method in dict.fromkeys(row["method"] for row in rows):
        scatter(out / f"fig2_{method}.png", method, [row for row in rows if row["method"] == method])
    (out / "analysis.json").write_text(json.dumps({"workdirs": [str(d) for d in directories], "targets": pattern}))
    return out / "analysis.md"


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    workdirs = flags.DEFINE_list("workdirs", None, "Runs (or sweep directories), comma-separated or space-separated.")
    pattern = flags.DEFINE_string("targets", DEFAULT_TARGETS, "Regex over '/'-joined kernel paths.")
    out = flags.DEFINE_string("out", "", "Where to write (default: the first workdir).")

    def body(args):
        absl_logging.set_verbosity(absl_logging.WARNING)
        given = (workdirs.value or []) + list(args[1:])  # --workdirs A B: B arrives as an argument
        try:
            if not given:
                raise ConfigError("--workdirs: give at least one run or sweep directory")
            table = analyse(given, pattern.value, out.value or None)
        except DoraError as err:
            sys.exit(f"dora_jax.analysis: {err}")
        print(table.read_text())

    app.run(body, argv=argv)


if __name__ == "__main__":
    main()
