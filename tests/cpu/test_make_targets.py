"""Tier: cpu. The Makefile without a complete `make setup`: every target that runs the venv's
Python stops with the same "run 'make setup' first (<what is missing>)" message and a non-zero
exit, instead of a shell's Error 127 (no .venv/bin/python) or `No module named pytest` (a venv
whose dependency install was interrupted). RETRY_SUBMODULE=1 reaches tools/setup_megatron.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_TARGETS = [
    "test",
    "test-cpu",
    "test-dist",
    "test-gpu",
    "status",
    "train",
    "check-patches",
    "refresh-patches",
    "diff-report",
    "rebase-upstream REF=main",
    "lint",
]


def _copy(tmp_path) -> Path:
    """The Makefile and the lock it reads, without a venv or .build."""
    repo = tmp_path / "repo"
    (repo / "patches").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    shutil.copy(ROOT / "patches" / "upstream.lock", repo / "patches" / "upstream.lock")
    return repo


def make(repo, *args):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "PYTEST_ARGS"))
    }
    res = subprocess.run(["make", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.parametrize("target", VENV_TARGETS)
def test_no_venv(tmp_path, target):
    rc, out = make(_copy(tmp_path), *target.split())
    name = target.split()[0]
    assert rc != 0, out
    assert f"make {name}: run 'make setup' first (no .venv/bin/python)" in out, out
    assert "Error 127" not in out and "No such file or directory" not in out, out


def _base_python() -> str:
    """A Python 3.12 without this venv's packages (what an interrupted setup leaves)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(Path(base).resolve())


@pytest.mark.parametrize("target", ["test", "test-cpu", "status", "check-patches"])
def test_interrupted_setup(tmp_path, target):
    repo = _copy(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(_base_python())
    rc, out = make(repo, target)
    assert (
        rc != 0
        and f"make {target}: run 'make setup' first (the dependencies are not installed)" in out
    ), out
    assert "No module named" not in out, out

    (repo / ".venv" / ".fluid-deps").write_text("x\n")  # deps done, Megatron step interrupted
    rc, out = make(repo, target)
    assert rc != 0 and "run 'make setup' first (Megatron is not set up)" in out, out

    (repo / ".build").mkdir()
    (repo / ".build" / "setup-state.json").write_text("{}\n")  # overlay step not reached
    rc, out = make(repo, target)
    assert rc != 0 and "run 'make setup' first (the fluid overlay is not installed)" in out, out


def test_retry_submodule_reaches_setup(tmp_path):
    repo = _copy(tmp_path)
    rc, out = make(repo, "-n", "megatron", "RETRY_SUBMODULE=1")
    assert rc == 0 and "tools/setup_megatron.py" in out and "--retry-submodule" in out, out
    rc, out = make(repo, "-n", "megatron")
    assert rc == 0 and "--retry-submodule" not in out, out
