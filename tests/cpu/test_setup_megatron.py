"""Tier: cpu. tools/setup_megatron.py (`make setup`): a damaged megatron-core distribution cached in
.build/dist (a truncated download) is deleted and downloaded again instead of failing every rerun
with BadZipFile; an interrupted download leaves nothing in the cache; a failed submodule clone is
remembered and not retried from the same URL unless asked (RETRY_SUBMODULE=1) or the URL changes."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import setup_megatron as S  # noqa: E402

VERSION = "0.19.0"
WHEEL = f"megatron_core-{VERSION}-py3-none-any.whl"


def _wheel_bytes(tmp_path) -> bytes:
    """A small wheel with megatron/core files (incompressible, so truncation cuts into members)."""
    import os

    path = tmp_path / "build" / WHEEL
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("megatron/core/__init__.py", "")
        z.writestr("megatron/core/blob.bin", os.urandom(64 * 1024))
    return path.read_bytes()


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replaces `pip download` with a copy of `payload` into its -d folder; counts the calls."""
    calls = []
    real_run = subprocess.run

    def run(cmd, *a, **kw):
        if "pip" in cmd and "download" in cmd:
            calls.append(cmd)
            out = Path(cmd[cmd.index("-d") + 1])
            (out / WHEEL).write_bytes(calls_payload[0])
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *a, **kw)

    calls_payload = [_wheel_bytes(tmp_path)]
    monkeypatch.setattr(subprocess, "run", run)
    return calls, calls_payload


def test_truncated_cached_wheel_is_downloaded_again(tmp_path, fake_pip, capsys):
    calls, payload = fake_pip
    good = payload[0]
    dist = tmp_path / ".build" / "dist"
    dist.mkdir(parents=True)
    (dist / WHEEL).write_bytes(good[: len(good) // 2])  # an interrupted earlier download
    got = S._download_core(VERSION, dist)
    assert got == dist / WHEEL
    assert got.read_bytes() == good
    with zipfile.ZipFile(got) as z:
        assert z.testzip() is None
    assert len(calls) == 1
    assert "is damaged" in capsys.readouterr().out


def test_corrupt_member_in_cached_wheel_is_detected(tmp_path, fake_pip):
    """Full length, valid central directory, but a flipped byte inside a member (bad CRC)."""
    calls, payload = fake_pip
    good = bytearray(payload[0])
    off = good.index(b"megatron/core/blob.bin") + len("megatron/core/blob.bin") + 100
    good[off] ^= 0xFF
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / WHEEL).write_bytes(bytes(good))
    assert S.damaged(dist / WHEEL) is not None
    assert S._download_core(VERSION, dist).read_bytes() == payload[0] and len(calls) == 1


def test_intact_cached_wheel_is_reused(tmp_path, fake_pip):
    calls, payload = fake_pip
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / WHEEL).write_bytes(payload[0])
    assert S._download_core(VERSION, dist) == dist / WHEEL
    assert calls == []


def test_damaged_download_fails_with_a_message_and_caches_nothing(tmp_path, fake_pip):
    calls, payload = fake_pip
    payload[0] = payload[0][:1000]
    dist = tmp_path / "dist"
    with pytest.raises(SystemExit, match="is damaged"):
        S._download_core(VERSION, dist)
    assert list(dist.iterdir()) == []
    assert [p for p in dist.parent.iterdir() if p.name.startswith(".download-")] == []


# --- the submodule clone ---------------------------------------------------------------------


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def superproject(tmp_path, monkeypatch):
    """A repository whose Megatron-LM gitlink points at a URL that does not exist."""
    root = tmp_path / "repo"
    root.mkdir()
    _git("init", "-q", cwd=root)
    pin = "1" * 40
    (root / ".gitmodules").write_text(
        f'[submodule "Megatron-LM"]\n\tpath = Megatron-LM\n\turl = {tmp_path / "nowhere"}\n'
    )
    _git("update-index", "--add", "--cacheinfo", f"160000,{pin},Megatron-LM", cwd=root)
    (root / "patches").mkdir()
    (root / "patches" / "upstream.lock").write_text(f"commit {pin}\ntag t\nmegatron-core 0.0.1\n")
    monkeypatch.setattr(S, "ROOT", root)
    monkeypatch.setattr(S, "SUBMODULE", root / "Megatron-LM")
    monkeypatch.setattr(S, "BUILD", root / ".build")
    monkeypatch.setattr(S, "CLONE_FAILED", root / ".build" / "submodule-clone-failed.json")
    clones = []
    real_run = subprocess.run

    def run(cmd, *a, **kw):
        if "submodule" in cmd and "update" in cmd:
            clones.append(cmd)
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    return root, clones


def test_failed_clone_is_not_retried(superproject, tmp_path, capsys):
    root, clones = superproject
    assert S.try_submodule(None) is False
    assert len(clones) == 1
    rec = json.loads((root / ".build" / "submodule-clone-failed.json").read_text())
    assert rec["url"] == str(tmp_path / "nowhere") and rec["error"] and rec["time"]

    capsys.readouterr()
    assert S.try_submodule(None) is False
    assert len(clones) == 1  # remembered: no second attempt
    out = capsys.readouterr().out
    assert "not retrying" in out and "RETRY_SUBMODULE=1" in out

    assert S.try_submodule(None, retry=True) is False  # asked for
    assert len(clones) == 2
    assert S.try_submodule(str(tmp_path / "mirror")) is False  # another URL
    assert len(clones) == 3
    assert json.loads(S.CLONE_FAILED.read_text())["url"] == str(tmp_path / "mirror")
