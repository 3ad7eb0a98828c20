"""A sweep's results: ``results.csv`` (a row per point), ``results.md`` (mean ± std over seeds) and
``plots/`` (each final eval metric against each swept numeric key, a line per other setting).

A point's status is "done" (its summary holds the final evaluation), "unfinished" (started, not
done), "failed" (``error.txt``) or "missing" (never started); every point has its row, and the
tables count what is not done instead of dropping it.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
from typing import Any

import numpy as np

from dora_jax.errors import ConfigError
from dora_jax.sweep import point_name

SEED = "seed"


def point_status(directory: pathlib.Path) -> tuple[str, dict[str, Any] | None]:
    """(status, summary or None) of one point's directory."""
    summary_path = directory / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is not None and "after" in summary:
        return "done", summary
    if (directory / "error.txt").exists():
        return "failed", summary
    return ("unfinished" if directory.exists() else "missing"), summary


def gather(workdir: pathlib.Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(override keys, metric names, rows): one row per point of ``workdir/sweep.json``, in order."""
    path = workdir / "sweep.json"
    if not path.exists():
        raise ConfigError(f"{path}: no such file; is {workdir} the --workdir of a dora_jax.sweep run?")
    points = json.loads(path.read_text())["points"]
    keys = list(dict.fromkeys(key for point in points for key in point))
    rows, metrics = [], {}
    for point in points:
        status, summary = point_status(workdir / point_name(point))
        row = {key: point.get(key, "") for key in keys}
        row.update(status=status, step=summary["step"] if summary else "")
        if summary is not None:
            row["trainable_params"] = summary["trainable_params"]
        for name, value in (summary or {}).get("after", {}).items():
            metrics[name] = None
            row[f"eval/{name}"] = value
        rows.append(row)
    return keys, list(metrics), rows


def write_csv(path: pathlib.Path, keys: list[str], metrics: list[str], rows: list[dict[str, Any]]) -> None:
    columns = keys + ["status", "step", "trainable_params"] + [f"eval/{m}" for m in metrics]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def groups(keys: list[str], rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by every override key but the seed, in first-seen order."""
    setting = [key for key in keys if key != SEED]
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row[key] for key in setting), []).append(row)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def markdown(keys: list[str], metrics: list[str], rows: list[dict[str, Any]]) -> str:
    setting = [key for key in keys if key != SEED]
    lines = [
        f"Final evaluation, mean ± std over {SEED}s (sample std); `done` counts the finished points of each setting.",
        "",
        "| " + " | ".join(setting + ["done"] + metrics) + " |",
        "|" + "---|" * (len(setting) + 1 + len(metrics)),
    ]
    for values, members in groups(keys, rows).items():
        done = [row for row in members if row["status"] == "done"]
        others = [row["status"] for row in members if row["status"] != "done"]
        count = f"{len(done)}/{len(members)}" + (f" ({', '.join(sorted(set(others)))})" if others else "")
        cells = []
        for metric in metrics:
            found = [row[f"eval/{metric}"] for row in done if f"eval/{metric}" in row]
            cells.append("–" if not found else "{:.4f} ± {:.4f}".format(*mean_std(found)))
        # a regex value (adapter.targets) holds "|": escaped, or it would split the row into more cells
        lines.append("| " + " | ".join([str(v).replace("|", r"\|") for v in values] + [count] + cells) + " |")
    return "\n".join(lines) + "\n"


def numeric_keys(keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """Swept keys (not the seed) whose values are numbers taking at least two values."""
    out = []
    for key in keys:
        values = {row[key] for row in rows}
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if key != SEED and numbers and len(values) > 1:
            out.append(key)
    return out


def plot(out: pathlib.Path, keys: list[str], metrics: list[str], rows: list[dict[str, Any]]) -> list[pathlib.Path]:
    """One PNG per (metric, numeric key): mean over seeds with std error bars, a line per other setting.
    Bare Figures, no pyplot: no display needed, and a notebook's backend is left alone."""
    from matplotlib.figure import Figure

    written = []
    done = [row for row in rows if row["status"] == "done"]
    for x_key in numeric_keys(keys, rows):
        line_keys = [key for key in keys if key not in (SEED, x_key)]
        for metric in metrics:
            fig = Figure(figsize=(5, 3.5))
            ax = fig.subplots()
            for line, members in groups([k for k in keys if k != x_key], done).items():
                by_x: dict[Any, list[float]] = {}
                for row in members:
                    if f"eval/{metric}" in row:
                        by_x.setdefault(row[x_key], []).append(row[f"eval/{metric}"])
                xs = sorted(by_x)
                stats = [mean_std(by_x[x]) for x in xs]
                label = ", ".join(f"{k}={v}" for k, v in zip(line_keys, line, strict=True)) or metric
                ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
            values = sorted({row[x_key] for row in rows})
            if values[0] > 0 and values[-1] / values[0] >= 8:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.set_ylabel(f"eval {metric}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / re.sub(r"[^A-Za-z0-9._-]", "_", f"{metric}_vs_{x_key}.png")
            fig.savefig(path, dpi=100)
            written.append(path)
    return written


def write(workdir: pathlib.Path) -> pathlib.Path:
    """Writes results.csv, results.md and plots/ for the sweep in ``workdir``; returns results.md."""
    workdir = pathlib.Path(workdir)
    keys, metrics, rows = gather(workdir)
    write_csv(workdir / "results.csv", keys, metrics, rows)
    table = workdir / "results.md"
    table.write_text(markdown(keys, metrics, rows))
    (workdir / "plots").mkdir(exist_ok=True)
    plot(workdir / "plots", keys, metrics, rows)
    return table
