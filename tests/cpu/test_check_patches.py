"""Tier: cpu. `make check-patches` catches a broken series and a hand-edited submodule.

Most cases copy patches/ to a temporary folder, break one thing, and run the real CLI
(`tools/patches.py check`) against a pristine copy of the files the series touches (from the
submodule's git at the pinned commit, or from the installed megatron-core wheel in core-only
mode). The unbroken copy must pass first, so every failure below is caused by the one thing the
case broke. The submodule cases run `tools/check_patches.py` on the synthetic superproject of
tests/cpu/upstream_fixture.py (a full-mode checkout, offline).
"""

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fixture module beside us
from upstream_fixture import CFG, MOE, make_superproject, make_upstream, sh  # noqa: E402

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
        [
            sys.executable,
            str(ROOT / "tools" / "patches.py"),
            "check",
            "--tree",
            str(tree),
            "--patches",
            str(pdir),
            "--root",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
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
    ctx = next(
        i
        for i in range(first_hunk + 1, len(lines))
        if lines[i].startswith(" ") and lines[i].strip()
    )
    lines[ctx] = " " + lines[ctx][1:].rstrip("\n") + "  # drifted\n"
    f.write_text("".join(lines))
    if shutil.which("patch"):  # prove this really is a fuzz case, not garbage
        diff = P.read_patch(f).diff
        fuzz = subprocess.run(
            ["patch", "--dry-run", "-p1", "-F3", "-d", str(tree)],
            input=diff,
            capture_output=True,
            text=True,
        )
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
    f.write_text(
        "".join(ln for ln in f.read_text().splitlines(True) if not ln.startswith("Forwarded:"))
    )
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
    f.write_text(
        text.replace(header, header.replace(f"-{old_start},", f"-{int(old_start) + 1},", 1), 1)
    )
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


def _set_header_field(f, name, value):
    """Replace header field `name` (with its continuation lines) of patch file f."""
    head, sep, rest = f.read_text().partition("\n---\n")
    lines, out, skipping = head.splitlines(True), [], False
    for ln in lines:
        if ln.startswith(f"{name}:"):
            out.append(f"{name}: {value}\n")
            skipping = True
        elif skipping and ln[:1] in " \t":
            continue
        else:
            skipping = False
            out.append(ln)
    f.write_text("".join(out) + sep + rest)


def test_test_path_that_does_not_exist(case):
    tree, pdir = case
    f = first_patch(pdir)
    _set_header_field(f, "Test", "tests/cpu/test_never_written.py (covers it, honest).")
    rc, out = check(tree, pdir)
    assert rc == 1 and "cite tests that do not exist" in out, out
    assert f"{f.name}: 'Test:' names tests/cpu/test_never_written.py, which does not exist" in out


def test_test_name_that_does_not_exist(case):
    tree, pdir = case
    f = first_patch(pdir)
    _set_header_field(f, "Test", "tests/cpu/test_patches_applied.py::test_never_written")
    rc, out = check(tree, pdir)
    assert rc == 1, out
    assert (
        "names tests/cpu/test_patches_applied.py::test_never_written, which "
        "tests/cpu/test_patches_applied.py does not define"
    ) in out, out


def test_test_field_naming_no_file(case):
    tree, pdir = case
    f = first_patch(pdir)
    _set_header_field(f, "Test", "by hand, trust me.")
    rc, out = check(tree, pdir)
    assert rc == 1 and f"{f.name}: 'Test:' names no test file" in out, out


def _probed_patch(pdir):
    return next(p for p in P.read_series(pdir) if P.header_field(p.header, "Probe"))


def test_probe_that_finds_nothing_at_the_pin(case, tmp_path):
    """A bug-fix patch whose bug the pin does not have is not needed: fixed upstream."""
    tree, pdir = case
    patch = _probed_patch(pdir)
    probe = tmp_path / "probe_none.py"
    probe.write_text("def probe(tree):\n    return {}\n")
    _set_header_field(patch.path, "Probe", f"{probe}:probe")
    rc, out = check(tree, pdir)
    assert (
        rc == 1 and f"{patch.name}: its probe {probe}:probe finds nothing before the patch" in out
    )
    assert "fixed upstream: drop it" in out


def test_probe_that_still_finds_the_bug_after_the_series(case, tmp_path):
    tree, pdir = case
    patch = _probed_patch(pdir)
    probe = tmp_path / "probe_always.py"
    probe.write_text("def probe(tree):\n    return {'x': 'always broken'}\n")
    _set_header_field(patch.path, "Probe", f"{probe}:probe")
    rc, out = check(tree, pdir)
    assert rc == 1 and "still finds the bug with the series applied: always broken" in out, out


def test_probe_that_does_not_resolve(case):
    tree, pdir = case
    patch = _probed_patch(pdir)
    _set_header_field(patch.path, "Probe", "tools/probes.py:no_such_probe")
    rc, out = check(tree, pdir)
    assert rc == 1 and "tools/probes.py has no no_such_probe()" in out, out


# ---------------------------------------------------------------- the submodule's working files


@pytest.fixture(scope="module")
def fake_upstream(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp") / "Megatron-LM.git"
    return path, make_upstream(path)


@pytest.fixture
def superproject(tmp_path, fake_upstream):
    up, refs = fake_upstream
    return make_superproject(tmp_path / "super", up, refs["pin"])


def check_submodule(root):
    res = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_patches.py"), "--root", str(root)],
        capture_output=True,
        text=True,
    )
    return res.returncode, res.stdout + res.stderr


def _edit_line(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new))
    return line


def test_submodule_with_the_series_passes(superproject):
    rc, out = check_submodule(superproject)
    assert rc == 0 and "Megatron-LM/ is the pin with the series applied" in out, out


@pytest.mark.parametrize(
    "rel, old, new",
    [
        (
            MOE,
            "        self.fluid_seen = True\n",
            "        self.fluid_seen = False\n",
        ),  # a patched line
        (MOE, "        bias = 0\n", "        bias = 1\n"),  # elsewhere in a patched file
        (CFG, "    num_layers: int = 0\n", "    num_layers: int = 1\n"),  # a file two patches touch
    ],
)
def test_edit_in_a_patched_file_is_named(superproject, rel, old, new):
    sub = superproject / "Megatron-LM"
    line = _edit_line(sub / rel, old, new)
    rc, out = check_submodule(superproject)
    assert rc == 1 and "holds edits that are neither the pin nor the series" in out, out
    assert (
        f"{rel}: differs from the pin with the series applied: line {line}: "
        f"{new.strip()!r}, expected {old.strip()!r}"
    ) in out, out
    # make setup (patches.apply_verified) refuses it as well
    with pytest.raises(P.PatchError, match="are not the pin: an edit the series does not make"):
        P.apply_verified(sub, superproject / "patches", log=lambda m: None)


def test_edit_outside_the_series_is_named(superproject):
    sub = superproject / "Megatron-LM"
    info = sub / "megatron" / "core" / "package_info.py"
    line = _edit_line(info, "PATCH = 0\n", "PATCH = 7\n")
    (sub / "megatron" / "core" / "stray.py").write_text("x = 1\n")
    rc, out = check_submodule(superproject)
    assert rc == 1, out
    assert (
        f"megatron/core/package_info.py: changed, and the series does not touch it: line "
        f"{line}: 'PATCH = 7', expected 'PATCH = 0'"
    ) in out, out
    assert "megatron/core/stray.py: untracked, neither upstream nor made by the series" in out


def test_submodule_off_the_pin(superproject, fake_upstream):
    up, refs = fake_upstream
    sub = superproject / "Megatron-LM"
    sh(sub, "git", "checkout", "-q", "-f", "--detach", refs["clean"])
    rc, out = check_submodule(superproject)
    assert rc == 1 and f"Megatron-LM is at {refs['clean'][:12]}, not the pin" in out, out
