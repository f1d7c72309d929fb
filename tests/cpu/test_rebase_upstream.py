"""Tier: cpu. `tools/rebase_upstream.py` on a synthetic upstream repository and superproject.

The fake upstream (tests/cpu/upstream_fixture.py) has a pin and branches that move the patched
files in different ways; every test runs the real CLI in a subprocess, offline, in a few seconds.
"""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fixture module beside us
from upstream_fixture import CFG, MOE, TOOLS, P, make_superproject, make_upstream, sh, snapshot  # noqa: E402


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    path = tmp_path_factory.mktemp("up") / "Megatron-LM.git"
    return path, make_upstream(path)


@pytest.fixture
def superproject(tmp_path, upstream):
    up, refs = upstream
    return make_superproject(tmp_path / "super", up, refs["pin"])


def rebase(root, ref, url):
    res = subprocess.run(
        [sys.executable, str(TOOLS / "rebase_upstream.py"), "--root", str(root), "--ref", ref,
         "--url", str(url), "--no-test"],
        capture_output=True, text=True,
    )
    return res.returncode, res.stdout + res.stderr


def staged_gitlink(root):
    """The submodule commit staged in the superproject's index."""
    return sh(root, "git", "ls-files", "-s", "--", "Megatron-LM").split()[1]


def test_clean_rebase_updates_gitlink_lock_and_patches(superproject, upstream):
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    before = snapshot(root)
    rc, out = rebase(root, "core_v0.2.0", up)
    assert rc == 0, out
    new = refs["clean"]
    # gitlink staged (not committed), submodule checked out at the new commit, series applied
    assert staged_gitlink(root) == new
    assert sh(root, "git", "rev-parse", "HEAD:Megatron-LM") == refs["pin"]  # nothing committed
    assert sh(sub, "git", "rev-parse", "HEAD") == new
    assert "self.fluid_seen = True" in (sub / MOE).read_text()
    assert "use_fluid_moe: bool = False" in (sub / CFG).read_text()
    # lock rewritten for the new commit with the new blobs
    lock = P.read_lock(root / "patches")
    assert lock["commit"] == new and lock["tag"] == "core_v0.2.0"
    assert lock["megatron-core"] == "0.2.0"
    for rel in (MOE, CFG):
        assert lock["files"][rel] == sh(sub, "git", "rev-parse", f"{new}:{rel}")
    # the moe patch was refreshed: its hunk moved down by as many lines as the clean variant
    # inserted above it; header kept, no index lines
    def hunk_start(text):
        header = next(ln for ln in text.splitlines() if ln.startswith("@@ "))
        return int(header.split()[1][1:].split(",")[0])

    def line_of(ref):
        return sh(sub, "git", "show", f"{ref}:{MOE}").splitlines().index("        bias = 0")

    shift = line_of(new) - line_of(refs["pin"])
    assert shift > 0
    text = (root / "patches" / "0002-moe-hook.patch").read_text()
    assert hunk_start(text) == hunk_start(before["patches/0002-moe-hook.patch"].decode()) + shift
    assert text.startswith("Description: moe hook")
    assert "\nindex " not in text
    # the whole refreshed series applies with no fuzz to the new pristine files, refresh a no-op
    pristine = root.parent / "pristine"
    P.pristine_from_git(sub, new, [MOE, CFG], pristine)
    P.check(pristine, root / "patches", log=lambda m: None)
    # the API check ran: a new optional parameter on the overridden forward is compatible
    assert "| compatible | `megatron.core.transformer.moe.moe_layer.MoELayer.forward`" in out
    # the submodule's index is clean (the 3-way staging is undone): only work-tree edits
    assert sh(sub, "git", "diff", "--cached", "--name-only") == ""


def test_context_drift_merges_with_3way(superproject, upstream):
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    rc, out = rebase(root, refs["drift"], up)
    assert rc == 0, out
    assert "with a 3-way merge" in out
    moe = (sub / MOE).read_text()
    assert "scale = 2  # upstream" in moe and "self.fluid_seen = True" in moe
    # the refreshed patch carries the new context, so it applies strictly to the new pin
    assert "scale = 2  # upstream" in (root / "patches" / "0002-moe-hook.patch").read_text()
    assert staged_gitlink(root) == refs["drift"]


def test_conflict_names_patch_file_hunk_and_restores(superproject, upstream):
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    before = snapshot(root)
    rc, out = rebase(root, "conflict", up)
    assert rc == 1, out
    hunk = next(ln for ln in before["patches/0002-moe-hook.patch"].decode().splitlines()
                if ln.startswith("@@ "))
    assert "FAILED patch 0002-moe-hook.patch" in out
    assert f"{MOE}: hunk {hunk}" in out, out
    assert f"3-way merge left conflicts in {MOE}" in out
    assert "applied 0001-config-flag.patch" in out  # the earlier patch was fine
    # everything is back: pin checked out, series applied, nothing staged, patches/lock untouched
    assert sh(sub, "git", "rev-parse", "HEAD") == refs["pin"]
    assert snapshot(root) == before
    assert sh(root, "git", "diff", "--cached", "--name-only") == ""
    assert sh(sub, "git", "diff", "--cached", "--name-only") == ""
    assert "<<<<<<<" not in (sub / MOE).read_text()


def test_refuses_local_edits_outside_the_series(superproject, upstream):
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    (sub / MOE).write_text((sub / MOE).read_text() + "# hand edit\n")
    rc, out = rebase(root, "core_v0.2.0", up)
    assert rc == 1 and "differ from the series" in out, out
    assert sh(sub, "git", "rev-parse", "HEAD") == refs["pin"]
    assert (sub / MOE).read_text().endswith("# hand edit\n")  # the edit is not lost
