"""Every ```python block of the README runs as written, and the shipped configs build."""

import importlib.util
import pathlib
import re

import pytest

from dora_jax.core import AdapterConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks(ROOT / "README.md"))))
def test_readme_python_block_runs(index):
    code = python_blocks(ROOT / "README.md")[index]
    exec(compile(code, f"README.md block {index}", "exec"), {})


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
