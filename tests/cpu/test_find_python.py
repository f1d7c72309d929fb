"""Tier: cpu. `tools/find-python.sh` (used by `make setup`): finds a Python 3.12 by itself, honours
a valid PYTHON= override, and refuses a wrong one with a message."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "find-python.sh"


def _run(env_python=None):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())}
    import os

    for k in ("PYENV_ROOT",):
        if k in os.environ:
            env[k] = os.environ[k]
    env["PATH"] = f"{Path.home()}/.pyenv/bin:{Path.home()}/.pyenv/shims:" + env["PATH"]
    if env_python is not None:
        env["PYTHON"] = env_python
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)


def _version(py):
    out = subprocess.run(
        [py, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    return out.stdout.strip()


def test_finds_a_312_interpreter():
    res = _run()
    assert res.returncode == 0, res.stderr
    assert _version(res.stdout.strip()) == "(3, 12)"


def test_valid_override_is_used():
    res = _run(sys.executable)  # the venv's own 3.12
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == sys.executable


def test_wrong_override_fails_with_a_message(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 3.11\n")
    fake.chmod(0o755)
    res = _run(str(fake))
    assert res.returncode != 0
    assert "is not a Python 3.12 interpreter" in res.stderr
