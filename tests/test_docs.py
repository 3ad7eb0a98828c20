"""The docs say what the code does: every ```python block runs, and the reference tables list
exactly the fields and keys the code defines, with their defaults."""

import dataclasses
import importlib.util
import pathlib
import re

import pytest

from dora_jax import run_config
from dora_jax.core import AdapterConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [(page, index) for page in PAGES for index in range(len(python_blocks(page)))]


@pytest.mark.parametrize(("page", "index"), BLOCKS, ids=[f"{p.relative_to(ROOT)}:{i}" for p, i in BLOCKS])
def test_python_block_runs(page, index):
    code = python_blocks(page)[index]
    exec(compile(code, f"{page.relative_to(ROOT)} block {index}", "exec"), {})


def test_every_page_has_a_python_block_or_is_prose_only_on_purpose():
    without = {p.name for p in PAGES if not python_blocks(p)}
    assert without <= {"training.md", "performance.md"}, without


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_to_existing_files_and_headings(page):
    for target in re.findall(r"\]\(([^)#:]+\.md)?(#[^)]+)?\)", page.read_text()):
        path, anchor = target
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor[1:] in slugs, f"{page.name} links to {path}{anchor}; headings: {sorted(slugs)}"


def table_rows(page, heading):
    """The rows (lists of cells) of the first table under ``## heading``."""
    text = (ROOT / page).read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # after the header
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def documented_default(value):
    """How a default is written in the docs' tables."""
    if isinstance(value, str):
        return '`"' + value.replace("|", r"\|") + '"`'
    return f"`{value!r}`"


def test_config_reference_lists_every_key_with_its_default():
    rows = {row[0].strip("`"): row[1] for row in table_rows("docs/training.md", "Config reference")}
    schema = run_config.flat(run_config.defaults())
    assert sorted(rows) == sorted(schema)
    for key, value in schema.items():
        if not isinstance(value, dict) or not value:
            assert rows[key] == documented_default(value), key


def test_adapter_config_reference_lists_every_field_with_its_default():
    rows = {row[0].strip("`"): row[1] for row in table_rows("docs/concepts.md", "`AdapterConfig` reference")}
    fields = {f.name: f for f in dataclasses.fields(AdapterConfig)}
    assert sorted(rows) == sorted(fields)
    for name, field in fields.items():
        if field.default is dataclasses.MISSING:
            assert rows[name] == "required", name
        elif field.default == ():
            assert rows[name] == "`{}`", name  # a mapping in the config, stored as a tuple of pairs
        else:
            assert rows[name] == documented_default(field.default), name


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_screen = "\n".join(text.splitlines()[:40])
    assert "bash scripts/run.sh" in first_screen and "bash scripts/test.sh" in first_screen


def load_config_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["dora_r32", "lora_r32", "dora_r16", "dora_r8"])
def test_adapter_presets_build_adapter_configs(preset):
    cfg = AdapterConfig.from_dict(load_config_module("adapters").get_config(preset))
    assert cfg.rank * 2 == cfg.alpha and cfg.target_patterns == (r".*/(q_proj|k_proj|v_proj|up_proj|down_proj)/kernel",)


def test_unknown_adapter_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'dora_r4'; choose one of \['dora_r16', 'dora_r32'"):
        load_config_module("adapters").get_config("dora_r4")
