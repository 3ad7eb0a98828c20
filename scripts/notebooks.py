"""Executes the notebooks in notebooks/, each in a fresh Jupyter kernel, and saves their outputs.

    python -m scripts.notebooks                       # every notebook, outputs saved in place
    python -m scripts.notebooks quickstart            # one notebook
    python -m scripts.notebooks --no-save STEPS=10    # a check: parameters injected, nothing written

``bash scripts/notebooks.sh`` runs this in the project's venv. The tests call ``execute`` with small
parameters. Parameters are injected as papermill does: a cell after the one tagged ``parameters``
assigns the new values. A notebook listed in ``CPU_DEVICES`` runs on that many forced host
devices when the machine has no accelerator, so its sharding code really shards.
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
import time
from typing import Any

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CPU_DEVICES = {"tpu_llama": 8}  # notebooks that need a multi-device mesh even on a CPU
INJECTED_TAG = "injected-parameters"


class NotebookError(Exception):
    """A notebook that cannot be run as asked: unknown name, no parameters cell, a bad parameter."""


def names() -> list[str]:
    """The notebooks, by name (file stem), sorted."""
    return sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))


def path_of(name: str) -> pathlib.Path:
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.exists():
        raise NotebookError(f"no notebook {name!r} in {NOTEBOOKS}; the notebooks: {', '.join(names())}")
    return path


def parameter_names(notebook: Any) -> list[str]:
    """The names the ``parameters`` cell assigns."""
    cell = next((c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise NotebookError("the notebook has no cell tagged 'parameters'")
    tree = ast.parse(cell.source)
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]


def inject(notebook: Any, parameters: dict[str, Any]) -> None:
    """Adds a cell after the ``parameters`` cell that assigns ``parameters`` (names it must define)."""
    known = parameter_names(notebook)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise NotebookError(f"unknown parameters {unknown}; the notebook's parameters: {', '.join(known)}")
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Injected parameters\n" + "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    notebook.cells.insert(index + 1, cell)


def kernel_env(name: str) -> dict[str, str]:
    """The kernel's environment: ours, the repository importable, forced host devices where listed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    devices = CPU_DEVICES.get(name)
    if devices and env.get("JAX_PLATFORMS", "cpu") == "cpu" and not _has_accelerator():
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _has_accelerator() -> bool:
    return pathlib.Path("/dev/nvidia0").exists() or pathlib.Path("/dev/accel0").exists()


def execute(
    name: str,
    parameters: dict[str, Any] | None = None,
    cwd: str | pathlib.Path | None = None,
    timeout: int = 900,
    record_timing: bool = True,
) -> Any:
    """Runs notebook ``name`` top to bottom in a fresh kernel started in ``cwd`` (default: notebooks/);
    returns the executed notebook. A cell that raises raises ``nbclient.exceptions.CellExecutionError``."""
    notebook = nbformat.read(path_of(name), as_version=4)
    if parameters:
        inject(notebook, parameters)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=record_timing,
        resources={"metadata": {"path": str(cwd or NOTEBOOKS)}},
    )
    client.execute(env=kernel_env(name))
    return notebook


def save(name: str, notebook: Any) -> pathlib.Path:
    """Writes an executed notebook over its file (the injected-parameters cell dropped)."""
    notebook.cells = [c for c in notebook.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    path = path_of(name)
    nbformat.write(notebook, path)
    return path


def main_parameters(items: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` items as parameters: a Python literal where VALUE is one, else the string."""
    out = {}
    for name, _, text in (item.partition("=") for item in items):
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[name] = text
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help="notebook names (default: all) and NAME=VALUE parameters")
    parser.add_argument("--no-save", action="store_true", help="execute only; leave the files as they are")
    args = parser.parse_intermixed_args(argv)
    chosen = [item for item in args.items if "=" not in item] or names()
    parameters = main_parameters([item for item in args.items if "=" in item])
    try:
        for name in chosen:
            path_of(name)
        for name in chosen:
            start = time.perf_counter()
            notebook = execute(name, parameters, record_timing=False)
            where = "not saved" if args.no_save else save(name, notebook).relative_to(ROOT)
            print(f"{name}: ran in {time.perf_counter() - start:.0f} s ({where})", flush=True)
    except NotebookError as err:
        print(f"scripts.notebooks: {err}", file=sys.stderr)
        return 2
    except nbclient.exceptions.CellExecutionError as err:
        print(f"scripts.notebooks: {name} failed:\n{err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
