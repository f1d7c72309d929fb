#!/usr/bin/env python3
"""Make the patched, pinned Megatron the one the venv imports (called by `make setup`).

Two modes, chosen by what can be had:
  full       the `Megatron-LM/` submodule at the pinned commit (cloned from the .gitmodules URL, or
             from MEGATRON_LM_URL for a mirror). The series is applied in the submodule; the venv
             imports `megatron.*` (core and training) from it, and `pretrain_gpt.py` can run.
  core-only  no submodule (no network to GitHub, as on CI): `megatron/core` is taken from the
             `megatron-core==<pin>` distribution on the package index (wheel, else sdist), each
             file the series touches is checked against the blob hashes in patches/upstream.lock
             (refusing on mismatch), the core patches are applied to a copy in
             .build/megatron-core, and the venv imports `megatron.core` from there. Patches that
             touch megatron/training are skipped; `pretrain_gpt.py` and `megatron.training` are
             unavailable, and everything that needs them says so.

Idempotent: a second run finds the series applied and the import path in place and changes
nothing. The chosen mode and the applied patches are written to .build/setup-state.json, which
`fluid.print_status()` reads.

The pin (commit, tag, megatron-core version) is read from patches/upstream.lock, its one source.
A failed submodule clone is remembered in .build/submodule-clone-failed.json (URL, time, error):
later runs go straight to core-only mode instead of waiting on the clone again, until the URL
changes (MEGATRON_LM_URL) or --retry-submodule (`make setup RETRY_SUBMODULE=1`) asks for it.
A cached distribution in .build/dist is used only if it reads back whole (every zip member's
CRC, or the whole tar); a damaged one is deleted and downloaded again.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import patches as P  # noqa: E402

SUBMODULE = ROOT / "Megatron-LM"
BUILD = ROOT / ".build"
CORE_COPY = BUILD / "megatron-core"
PTH_NAME = "fluidmoe_megatron.pth"
CLONE_FAILED = BUILD / "submodule-clone-failed.json"


def sh(*cmd, cwd=ROOT, check=True, timeout=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, check=check, text=True, capture_output=True, timeout=timeout, env=env
    )


def pinned_commit() -> str:
    return P.read_lock(ROOT / "patches")["commit"]


def pinned_core_version() -> str:
    return P.read_lock(ROOT / "patches")["megatron-core"]


def _submodule_ready() -> bool:
    return (SUBMODULE / "megatron" / "core").is_dir() and _submodule_head() == pinned_commit()


def _clone_source(url: str | None) -> str:
    """Where the clone comes from: `url`, else the submodule URL of .gitmodules."""
    if url:
        return url
    res = subprocess.run(
        ["git", "config", "-f", ".gitmodules", "submodule.Megatron-LM.url"],
        cwd=ROOT,
        text=True,
        capture_output=True,
    )
    return res.stdout.strip() or "(.gitmodules)"


def _failed_clone(source: str) -> dict | None:
    """The recorded failure of a clone from `source`, if any."""
    try:
        rec = json.loads(CLONE_FAILED.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("url") == source else None


def try_submodule(url: str | None, retry: bool = False) -> bool:
    """Populate Megatron-LM/ at the gitlink; True if it is there afterwards.

    A failed clone is recorded in CLONE_FAILED and not attempted again from the same source
    unless `retry`: without network to the source each attempt can take up to the 600 s timeout.
    """
    if _submodule_ready():
        CLONE_FAILED.unlink(missing_ok=True)
        return True
    if not (ROOT / ".git").exists():
        return False
    source = _clone_source(url)
    failed = _failed_clone(source)
    if failed and not retry:
        print(
            f"  submodule: the clone from {source} failed at {failed.get('time')} "
            f"({failed.get('error')}); not retrying (make setup RETRY_SUBMODULE=1 retries, "
            "MEGATRON_LM_URL=<mirror> clones from elsewhere)"
        )
        return False
    cmd = ["git", "-c", "protocol.file.allow=always"]
    if url:
        cmd += ["-c", f"submodule.Megatron-LM.url={url}"]
    cmd += ["submodule", "update", "--init", "--", "Megatron-LM"]
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600, env=env)
        error = (res.stderr.strip().splitlines() or ["?"])[-1] if res.returncode else None
    except subprocess.TimeoutExpired:
        error = "timed out after 600 s"
    if error is None and not _submodule_ready():
        error = f"Megatron-LM/ is not at the pin {pinned_commit()[:12]} afterwards"
    if error is None:
        CLONE_FAILED.unlink(missing_ok=True)
        return True
    print(f"  submodule: cannot fetch Megatron-LM from {source} ({error})")
    BUILD.mkdir(exist_ok=True)
    record = {"url": source, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "error": error}
    CLONE_FAILED.write_text(json.dumps(record, indent=2) + "\n")
    return False


def _submodule_head() -> str | None:
    if not (SUBMODULE / ".git").exists():
        return None
    res = sh("git", "-C", str(SUBMODULE), "rev-parse", "HEAD", check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def _core_dists(folder: Path, version: str) -> list[Path]:
    """megatron-core `version` distributions in `folder` (wheels first, then sdists)."""
    wheels = sorted(folder.glob(f"megatron_core-{version}-*.whl"))
    sdists = [folder / f"megatron_core-{version}{ext}" for ext in (".tar.gz", ".zip")]
    return wheels + [p for p in sdists if p.is_file()]


def damaged(dist: Path) -> str | None:
    """Why `dist` (wheel, .zip or .tar.gz) cannot be read back whole, or None if it can.

    Reads every member: a zip's CRCs (a truncated download loses the central directory at its
    end), a tar to its last block."""
    try:
        if dist.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(dist) as z:
                bad = z.testzip()
            return f"bad CRC in {bad}" if bad else None
        with tarfile.open(dist) as t:
            for _ in t:
                pass
        return None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        return f"{type(e).__name__}: {e}"


def _download_core(version: str, dest: Path) -> Path:
    """The megatron-core distribution from the package index: a wheel if one fits, else sdist.

    A cached file in `dest` is reused only if it reads back whole (`damaged`); otherwise it is
    deleted and downloaded again. pip downloads into a temporary folder (pip checks the index's
    hash where the index gives one) and the file is moved into `dest` only when complete, so an
    interrupted download leaves nothing behind."""
    dest.mkdir(parents=True, exist_ok=True)
    for have in _core_dists(dest, version):
        why = damaged(have)
        if why is None:
            return have
        print(f"  core-only: cached {have} is damaged ({why}); deleting it and downloading again")
        have.unlink()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        res = subprocess.run(pip + [f"megatron-core=={version}"], text=True, capture_output=True)
        if res.returncode:
            res = subprocess.run(
                pip + ["--no-binary", ":all:", f"megatron-core=={version}"],
                text=True,
                capture_output=True,
            )
        got = _core_dists(Path(tmp), version)
        if res.returncode or not got:
            raise SystemExit(
                f"setup: could not download megatron-core=={version} from the package index:\n"
                f"{res.stderr}"
            )
        why = damaged(got[0])
        if why is not None:
            raise SystemExit(
                f"setup: the megatron-core=={version} download {got[0].name} is damaged ({why}); "
                "run `make setup` again"
            )
        final = dest / got[0].name
        os.replace(got[0], final)
    return final


def _extract_core(dist: Path, out: Path) -> None:
    """Extract megatron/core/** from a wheel or sdist into out/megatron/core."""
    out.mkdir(parents=True)
    if dist.suffix == ".whl":
        with zipfile.ZipFile(dist) as z:
            for name in z.namelist():
                if name.startswith("megatron/core/") and not name.endswith("/"):
                    z.extract(name, out)
    else:
        with tarfile.open(dist) as t:
            for m in t.getmembers():
                parts = m.name.split("/", 1)
                if len(parts) == 2 and parts[1].startswith("megatron/core/") and m.isfile():
                    m.name = parts[1]
                    t.extract(m, out, filter="data")


def _same_tree(a: Path, b: Path) -> bool:
    if not b.exists():
        return False
    cmp = filecmp.dircmp(a, b)

    def equal(c) -> bool:
        if c.left_only or c.right_only or c.diff_files or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and all(equal(s) for s in c.subdirs.values())

    return equal(cmp)


def setup_core_only(version: str) -> tuple[list[str], list[str]]:
    dist = _download_core(version, BUILD / "dist")
    print(f"  core-only: megatron/core from {dist.name}")
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        fresh = Path(tmp) / "megatron-core"
        _extract_core(dist, fresh)
        applied, skipped = _apply(fresh)  # refuses if a touched file differs from the pin
        if _same_tree(fresh, CORE_COPY):
            print("  core-only: .build/megatron-core already up to date")
        else:
            shutil.rmtree(CORE_COPY, ignore_errors=True)
            shutil.move(str(fresh), CORE_COPY)
    return applied, skipped


def _apply(tree: Path) -> tuple[list[str], list[str]]:
    """Check the still-pristine files against the lock and apply the series to `tree` (refuses
    on a mismatch); return (applied or already applied, skipped) patch names."""
    done = P.apply_verified(tree, ROOT / "patches", log=lambda m: print("  " + m.strip()))
    skipped = [p.name for p in P.read_series(ROOT / "patches") if p.name not in done]
    return done, skipped


def setup_full() -> tuple[list[str], list[str]]:
    applied, skipped = _apply(SUBMODULE)
    # The dataset helper extension: reuse the one the wheel ships, so Megatron does not try to
    # compile it at start-up (see docs/hardware.md).
    dst = SUBMODULE / "megatron" / "core" / "datasets"
    for so in _site_packages_glob("megatron/core/datasets/helpers_cpp*.so"):
        target = dst / Path(so).name
        if not target.exists() or not filecmp.cmp(so, target, shallow=False):
            shutil.copy2(so, target)
            os.utime(target)  # newer than helpers.cpp
    return applied, skipped


def _site_packages_glob(pattern: str) -> list[str]:
    out = []
    for sp in site.getsitepackages():
        out += glob.glob(os.path.join(sp, pattern))
    return out


def write_pth(path_first: Path) -> None:
    """Put the patched tree first on sys.path of this venv (before the wheel's megatron)."""
    sp = Path(site.getsitepackages()[0])
    pth = sp / PTH_NAME
    text = f"import sys; sys.path.insert(0, {str(path_first)!r})\n"
    if not pth.exists() or pth.read_text() != text:
        pth.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("MEGATRON_LM_URL") or None)
    ap.add_argument("--core-version", default=None)
    ap.add_argument(
        "--retry-submodule",
        action="store_true",
        help="clone the submodule even if the last clone from the same URL failed",
    )
    ap.add_argument(
        "--mode",
        choices=["auto", "full", "core-only"],
        default=os.environ.get("MEGATRON_MODE", "auto"),
    )
    args = ap.parse_args(argv)
    BUILD.mkdir(exist_ok=True)
    version = args.core_version or pinned_core_version()
    try:
        retry = args.retry_submodule or args.mode == "full"
        full = args.mode != "core-only" and try_submodule(args.url, retry=retry)
        if args.mode == "full" and not full:
            raise SystemExit(
                "setup: MEGATRON_MODE=full but the Megatron-LM submodule is not available"
            )
        if full:
            mode = "full"
            print(f"setup: FULL mode: Megatron-LM submodule at {pinned_commit()[:12]}")
            applied, skipped = setup_full()
            write_pth(SUBMODULE)
        else:
            mode = "core-only"
            print(
                "setup: CORE-ONLY mode: the Megatron-LM submodule cannot be fetched here "
                "(pass MEGATRON_LM_URL=<mirror> for the full tree)"
            )
            applied, skipped = setup_core_only(version)
            write_pth(CORE_COPY)
            print(
                "  unavailable in core-only mode: Megatron-LM/pretrain_gpt.py and megatron.training"
                " (make train, the end-to-end tests); everything in megatron.core works"
            )
    except P.PatchError as e:
        print(f"setup: {e}", file=sys.stderr)
        return 1
    state = {
        "mode": mode,
        "pinned_commit": pinned_commit(),
        "megatron_core_version": version,
        "megatron_path": str(SUBMODULE if mode == "full" else CORE_COPY),
        "applied_patches": applied,
        "skipped_patches": skipped,
    }
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    sf = BUILD / "setup-state.json"
    if not sf.exists() or sf.read_text() != text:
        sf.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
