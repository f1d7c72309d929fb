"""Tier: cpu. `tools/patches.py check` (what `make check-patches` runs) catches a broken series.

Each case copies patches/ to a temporary folder, breaks one thing, and runs the real CLI against a
pristine copy of the files the series touches (from the submodule's git at the pinned commit, or
from the installed megatron-core wheel in core-only mode). The unbroken copy must pass first, so
every failure below is caused by the one thing the case broke.
"""

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import patches as P  # noqa: E402

CONFIG = "megatron/core/transformer/transformer_config.py"


def _pristine(dest: Path) -> Path:
    pdir = ROOT / "patches"
    lock = P.read_lock(pdir)
    rels = sorted({f for p in P.read_series(pdir) for f in p.files})
    sub = ROOT / "Megatron-LM"
    if (sub / ".git").exists() and subprocess.run(
        ["git", "-C", str(sub), "cat-file", "-e", lock["commit"]], capture_output=True
    ).returncode == 0:
        P.pristine_from_git(sub, lock["commit"], rels, dest)
    else:  # core-only: the wheel's files (site-packages, never patched in place)
        try:
            dist = metadata.distribution("megatron-core")
        except metadata.PackageNotFoundError:
            pytest.skip("neither a Megatron-LM checkout nor the megatron-core wheel is available")
        for rel in rels:
            src = Path(dist.locate_file(rel))
            if src.exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    try:
        P.verify_lock(dest, pdir)
    except P.PatchError as e:
        pytest.skip(f"no pristine copy of the pinned files here: {e}")
    return dest


@pytest.fixture
def case(tmp_path):
    """(tree, patch dir): a pristine tree and a private copy of patches/."""
    tree = _pristine(tmp_path / "tree")
    pdir = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", pdir)
    return tree, pdir


def check(tree, pdir):
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "patches.py"), "check", "--tree", str(tree),
         "--patches", str(pdir)],
        capture_output=True, text=True,
    )
    return res.returncode, res.stdout + res.stderr


def first_patch(pdir):
    return pdir / P.read_series(pdir)[0].name


def test_unbroken_series_passes(case):
    rc, out = check(*case)
    assert rc == 0 and "check-patches: OK" in out, out


def test_fuzzed_patch_is_refused(case):
    """A context line that no longer matches: GNU patch would apply it with fuzz; we must not."""
    tree, pdir = case
    f = first_patch(pdir)
    lines = f.read_text().splitlines(keepends=True)
    first_hunk = next(i for i, ln in enumerate(lines) if ln.startswith("@@ "))
    ctx = next(i for i in range(first_hunk + 1, len(lines)) if lines[i].startswith(" ") and lines[i].strip())
    lines[ctx] = " " + lines[ctx][1:].rstrip("\n") + "  # drifted\n"
    f.write_text("".join(lines))
    if shutil.which("patch"):  # prove this really is a fuzz case, not garbage
        diff = P.read_patch(f).diff
        fuzz = subprocess.run(["patch", "--dry-run", "-p1", "-F3", "-d", str(tree)],
                              input=diff, capture_output=True, text=True)
        assert fuzz.returncode == 0 and "fuzz" in fuzz.stdout, fuzz.stdout + fuzz.stderr
    rc, out = check(tree, pdir)
    assert rc == 1 and f"{f.name} does not apply (no fuzz allowed)" in out, out


def test_patch_file_missing_from_series(case):
    tree, pdir = case
    shutil.copy(first_patch(pdir), pdir / "0099-forgotten.patch")
    rc, out = check(tree, pdir)
    assert rc == 1 and "not listed in patches/series: 0099-forgotten.patch" in out, out


def test_series_names_a_missing_file(case):
    tree, pdir = case
    with open(pdir / "series", "a") as s:
        s.write("0100-gone.patch\n")
    rc, out = check(tree, pdir)
    assert rc == 1 and "missing: 0100-gone.patch" in out, out


def test_upstream_file_differs_from_lock(case):
    tree, pdir = case
    with open(tree / CONFIG, "a") as f:
        f.write("# not the pinned upstream\n")
    rc, out = check(tree, pdir)
    assert rc == 1 and "differ from patches/upstream.lock" in out and CONFIG in out, out


def test_header_field_missing(case):
    tree, pdir = case
    f = first_patch(pdir)
    f.write_text("".join(ln for ln in f.read_text().splitlines(True) if not ln.startswith("Forwarded:")))
    rc, out = check(tree, pdir)
    assert rc == 1 and "lacks a 'Forwarded:' line" in out, out


def test_stale_patch_needs_refresh(case):
    """A hunk header off by one line still applies (git finds the offset) but is not what a
    refresh writes: check-patches must ask for `make refresh-patches`."""
    tree, pdir = case
    f = first_patch(pdir)
    text = f.read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("@@ "))
    old_start = header.split()[1][1:].split(",")[0]
    f.write_text(text.replace(header, header.replace(f"-{old_start},", f"-{int(old_start) + 1},", 1), 1))
    rc, out = check(tree, pdir)
    assert rc == 1 and "refreshing would change" in out and f.name in out, out


def test_apply_takes_a_new_patch_on_a_file_an_applied_patch_changed(case):
    """`make setup` after `git pull` brought a new patch: the tree already carries the older
    patches, so their files differ from the lock, yet the series must still apply; a touched file
    no applied patch explains must still be refused."""
    tree, pdir = case
    patches = P.read_series(pdir)
    first, rest = patches[0], patches[1:]
    assert any(set(first.files) & set(p.files) for p in rest), "needs two patches on one file"
    assert P._git_apply(tree, first).returncode == 0  # an older checkout: only the first applied
    assert P.apply_verified(tree, pdir, log=lambda m: None) == [
        p.name for p in patches if P.applicable(p, tree)
    ]
    # A pristine file edited by hand is still refused.
    fresh = _pristine(tree.parent / "fresh")
    other = next(f for p in rest for f in p.files if f not in first.files and (fresh / f).exists())
    (fresh / other).write_text((fresh / other).read_text() + "# local edit\n")
    with pytest.raises(P.PatchError, match="differ from patches/upstream.lock"):
        P.apply_verified(fresh, pdir, log=lambda m: None)
