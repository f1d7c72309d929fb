"""Tier: cpu. `tools/gpu_wheelhouse.sh` (called by `tools/stage_gpu.sh`): the wheels a GPU host
without a package index needs, with megatron-core at the version in `patches/upstream.lock`.
Offline: only the `--print-reqs` and `--dry-run` modes run here; nothing is downloaded."""

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_wheelhouse.sh"
EXTRAS = [
    "six",
    "regex",
    "pyyaml",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
]


def _run(*args):
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def _lock_version(lock: Path) -> str:
    versions = [
        line.split()[1]
        for line in lock.read_text().splitlines()
        if line.split()[:1] == ["megatron-core"]
    ]
    assert len(versions) == 1, f"{lock}: expected one 'megatron-core <version>' line"
    return versions[0]


def test_requirements_follow_the_lock():
    r = _run("--print-reqs")
    assert r.returncode == 0, r.stderr
    version = _lock_version(ROOT / "patches" / "upstream.lock")
    assert r.stdout.split() == [f"megatron-core=={version}", *EXTRAS]


def test_version_is_read_from_the_given_lock_not_a_literal(tmp_path):
    lock = tmp_path / "upstream.lock"
    text = (ROOT / "patches" / "upstream.lock").read_text()
    lock.write_text(re.sub(r"(?m)^megatron-core \S+$", "megatron-core 9.8.7", text))
    r = _run("--lock", lock, "--print-reqs")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "megatron-core==9.8.7"


def test_lock_without_the_pin_is_refused(tmp_path):
    lock = tmp_path / "upstream.lock"
    lock.write_text("commit 5be9626709af2722333bf54797c954c09edeada3\ntag core_v0.19.0\n")
    r = _run("--lock", lock, "--print-reqs")
    assert r.returncode != 0
    assert "megatron-core" in r.stderr and str(lock) in r.stderr
    r = _run("--lock", tmp_path / "missing.lock", "--print-reqs")
    assert r.returncode != 0 and "no lock file" in r.stderr


def test_dry_run_prints_a_py312_manylinux_binary_download(tmp_path):
    dest = tmp_path / "whl"
    r = _run("--dry-run", dest)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in argv
    opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert opts["--python-version"] == "3.12" and opts["--implementation"] == "cp"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms and all(p.endswith("x86_64") and p.startswith("manylinux") for p in platforms)
    assert "manylinux2014_x86_64" in platforms  # pydantic-core, pyyaml and regex ship these
    assert argv[argv.index("-d") + 1] == str(dest)
    assert argv[-len(EXTRAS) - 1 :] == _run("--print-reqs").stdout.split()
    assert not dest.exists(), "--dry-run must not download"


def test_unknown_option_is_refused():
    r = _run("--no-such-option")
    assert r.returncode == 2 and "--no-such-option" in r.stderr


def test_stage_gpu_uses_the_in_repo_tool():
    text = (ROOT / "tools" / "stage_gpu.sh").read_text()
    assert "bash tools/gpu_wheelhouse.sh .whl" in text


def test_lock_pin_matches_what_make_setup_installs():
    """The GPU host must run the megatron-core that `make setup` installs and the lock records."""
    reqs = subprocess.run(
        ["make", "-s", "print-reqs"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert reqs.returncode == 0, reqs.stderr
    m = re.search(r"megatron-core==(\S+)", reqs.stdout)
    assert m, reqs.stdout
    assert m.group(1) == _lock_version(ROOT / "patches" / "upstream.lock")
