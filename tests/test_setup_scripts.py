"""scripts/venv.sh: run.sh and test.sh install the requirements once, and again only when they change."""

import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def installs(repo, *args):
    """Calls ``ensure_venv NAME ARGS`` in ``repo`` and returns the pip calls logged so far."""
    subprocess.run(["bash", "-c", 'source scripts/venv.sh && ensure_venv "$@"', "ensure", *args], cwd=repo, check=True)
    return (repo / "pip_calls").read_text().splitlines() if (repo / "pip_calls").exists() else []


def fake_repo(tmp_path):
    """A repository whose .venv python only logs its arguments (nothing is installed)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "venv.sh", tmp_path / "scripts" / "venv.sh")
    (tmp_path / "requirements.txt").write_text("numpy>=2\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "pip_calls"}\n')
    python.chmod(0o755)
    return tmp_path


def test_requirements_are_installed_once_and_again_after_they_change(tmp_path):
    repo = fake_repo(tmp_path)
    assert len(installs(repo, "run", "-r", "requirements.txt")) == 1
    assert len(installs(repo, "run", "-r", "requirements.txt")) == 1
    (repo / "requirements.txt").write_text("numpy>=2.1\n")
    calls = installs(repo, "run", "-r", "requirements.txt")
    assert len(calls) == 2 and calls[-1].endswith("install --quiet --disable-pip-version-check -r requirements.txt")


def test_each_name_and_argument_list_has_its_own_stamp(tmp_path):
    repo = fake_repo(tmp_path)
    installs(repo, "run", "-r", "requirements.txt")
    assert len(installs(repo, "minilm", "--no-deps", "pkg==1")) == 2
    assert len(installs(repo, "minilm", "--no-deps", "pkg==2")) == 3


def test_a_failed_install_leaves_no_stamp(tmp_path):
    repo = fake_repo(tmp_path)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {repo / "pip_calls"}\nexit 1\n')
    command = "set -e; source scripts/venv.sh; ensure_venv run -r requirements.txt"
    result = subprocess.run(["bash", "-c", command], cwd=repo)
    assert result.returncode != 0 and not (repo / ".venv" / ".installed-run").exists()


def test_the_slowest_first_order_names_test_files_that_exist():
    from conftest import SLOWEST_FIRST

    assert all((ROOT / "tests" / name).exists() for name in SLOWEST_FIRST)
