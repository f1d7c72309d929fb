"""Tier: cpu. patches/upstream.lock is the one source of the Megatron pin (commit, tag,
megatron-core version): a changed lock reaches the requirement `make setup` installs
(`make print-reqs`), `fluid.status()` and tools/setup_megatron.py, and no code repeats the pin
(so `make rebase-upstream`, which rewrites only the lock, leaves nothing stale)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEW = {
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "tag": "core_v9.8.7",
    "megatron-core": "9.8.7",
}


def _lock_values(path: Path) -> dict:
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip() and ln[0] != "#"]
    return {ln[0]: ln[1] for ln in lines if ln[0] in NEW}


def _repo_with_new_lock(tmp_path) -> Path:
    """A copy of the files that read the pin, with the lock's three pin lines changed."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "patches", repo / "patches")
    (repo / "tools").mkdir()
    (repo / "overlay" / "fluid").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    for f in ("setup_megatron.py", "patches.py"):
        shutil.copy(ROOT / "tools" / f, repo / "tools" / f)
    shutil.copy(ROOT / "overlay" / "fluid" / "status.py", repo / "overlay" / "fluid" / "status.py")
    lock = repo / "patches" / "upstream.lock"
    old = _lock_values(lock)
    text = lock.read_text()
    for key, value in NEW.items():
        text = text.replace(f"{key} {old[key]}\n", f"{key} {value}\n")
    lock.write_text(text)
    assert _lock_values(lock) == NEW
    return repo


def test_changed_lock_reaches_every_reader(tmp_path):
    repo = _repo_with_new_lock(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    reqs = subprocess.run(
        ["make", "-s", "-C", str(repo), "print-reqs"], capture_output=True, text=True, env=env
    )
    assert reqs.returncode == 0, reqs.stderr
    assert "megatron-core==9.8.7" in reqs.stdout.split(), reqs.stdout

    probe = (
        "import importlib.util, json, sys\n"
        "sys.path.insert(0, sys.argv[1] + '/tools')\n"
        "import setup_megatron as S\n"
        "spec = importlib.util.spec_from_file_location('status_copy', sys.argv[1] + '/overlay/fluid/status.py')\n"
        "st = importlib.util.module_from_spec(spec); spec.loader.exec_module(st)\n"
        "print(json.dumps({'status': st._lock(), 'setup': [S.pinned_commit(), S.pinned_core_version()]}))\n"
    )
    res = subprocess.run([sys.executable, "-c", probe, str(repo)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["status"] == NEW
    assert got["setup"] == [NEW["commit"], NEW["megatron-core"]]


def test_no_missing_version_is_installed(tmp_path):
    """A lock without the megatron-core line stops `make print-reqs`/`deps` with a message instead of
    asking pip for `megatron-core==`."""
    repo = _repo_with_new_lock(tmp_path)
    lock = repo / "patches" / "upstream.lock"
    lock.write_text(
        "".join(
            ln for ln in lock.read_text().splitlines(True) if not ln.startswith("megatron-core ")
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    res = subprocess.run(
        ["make", "-s", "-C", str(repo), "print-reqs"], capture_output=True, text=True, env=env
    )
    assert res.returncode != 0 and "no 'megatron-core <version>' line" in res.stderr, res


def test_pin_is_written_only_in_the_lock():
    """The code that needs the pin reads it; none spells it out (docs may quote it)."""
    pin = _lock_values(ROOT / "patches" / "upstream.lock")
    needles = [pin["commit"], f"megatron-core=={pin['megatron-core']}", f'"{pin["tag"]}"']
    files = [ROOT / "Makefile", ROOT / "tests" / "dist" / "test_status.py", ROOT / ".ci" / "run"]
    for pattern in (
        "overlay/**/*.py",
        "tools/**/*.py",
        "tools/**/*.sh",
        "ci/**/*.sh",
        "benchmarks/**/*.py",
        "benchmarks/**/*.sh",
        "examples/**/*.py",
        "examples/**/*.sh",
    ):
        files += ROOT.glob(pattern)
    offenders = [
        f"{f.relative_to(ROOT)}: {n}"
        for f in files
        if f.is_file()
        for n in needles
        if n in f.read_text(errors="replace")
    ]
    assert offenders == [], offenders
