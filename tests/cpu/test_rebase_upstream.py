"""Tier: cpu. `tools/rebase_upstream.py` on a synthetic upstream repository and superproject.

The fake upstream (tests/cpu/upstream_fixture.py) has a pin and branches that move the patched
files in different ways; every test runs the real CLI in a subprocess, offline (the superproject's
.build/dist stands in for the package index), in a few seconds.
"""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fixture module beside us
from upstream_fixture import (  # noqa: E402
    CFG,
    MOE,
    SERIES,
    TOOLS,
    P,
    make_superproject,
    make_upstream,
    sh,
    snapshot,
)

sys.path.insert(0, str(TOOLS))
import upstream_src as U  # noqa: E402


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
        [
            sys.executable,
            str(TOOLS / "rebase_upstream.py"),
            "--root",
            str(root),
            "--ref",
            ref,
            "--url",
            str(url),
            "--no-test",
        ],
        capture_output=True,
        text=True,
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
    # the core_v0.2.0 release holds these files: core-only setup can use the lock
    assert "core-only setup can use the new lock (megatron-core 0.2.0" in out
    assert out.rstrip().endswith("rebase-upstream: exit 0: rebased")


def test_context_drift_merges_with_3way(superproject, upstream):
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    rc, out = rebase(root, refs["drift"], up)
    # rebased, but no release on the package index holds the drifted file: exit 3
    assert rc == 3, out
    assert "core-only setup (CI) could not use the new lock" in out
    assert "does not hold the new pin's megatron/core files" in out and MOE in out
    assert "exit 3: rebased, but core-only setup cannot use the new lock" in out
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
    hunk = next(
        ln
        for ln in before["patches/0002-moe-hook.patch"].decode().splitlines()
        if ln.startswith("@@ ")
    )
    assert "FAILED patch 0002-moe-hook.patch" in out
    assert f"{MOE}: hunk {hunk}" in out, out
    assert f"3-way merge left conflicts in {MOE}" in out
    assert "applied 0001-config-flag.patch" in out  # the earlier patch was fine
    assert "clean     0003-escape-percent.patch" in out  # and the later one: every outcome listed
    assert "exit 1: conflict, nothing changed" in out
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
    lines = len((sub / MOE).read_text().splitlines())
    rc, out = rebase(root, "core_v0.2.0", up)
    assert rc == 1 and "neither the pin nor the series" in out, out
    assert (
        f"{MOE}: differs from the pin with the series applied: line {lines}: '# hand edit'" in out
    )
    assert sh(sub, "git", "rev-parse", "HEAD") == refs["pin"]
    assert (sub / MOE).read_text().endswith("# hand edit\n")  # the edit is not lost


def test_fixed_upstream_patch_is_dropped(superproject, upstream):
    """Upstream fixed 0003's bug its own way ("10%%)" where 0003 writes "10 percent)"): a
    textual conflict, yet the patch is not needed any more. The rebase drops it, says so, and
    still reports the bug's new instance upstream added (the probe finds it)."""
    up, refs = upstream
    root, sub = superproject, superproject / "Megatron-LM"
    rc, out = rebase(root, "fixed", up)
    assert (
        "fixed upstream: drop it: 0003-escape-percent.patch (upstream fixed the bug its own "
        "way: probe tools/probes.py:percent_safe_config_help no longer finds moe_buffer_factor)"
        in out
    ), out
    assert "dropped 0003-escape-percent.patch (fixed upstream)" in out
    assert "CONFLICT" not in out
    assert not (root / "patches" / "0003-escape-percent.patch").exists()
    assert (
        root / "patches" / "series"
    ).read_text() == "0001-config-flag.patch\n0002-moe-hook.patch\n"
    assert "10%%)" in (sub / CFG).read_text() and "use_fluid_moe" in (sub / CFG).read_text()
    # the new instance of the bug is reported: exit 3
    assert "upstream has the bug elsewhere, which this patch does not fix" in out
    assert "moe_block" in out
    assert rc == 3 and "a probe finds its bug at the new pin" in out
    assert staged_gitlink(root) == refs["fixed"]


def test_same_change_upstream_is_dropped(superproject, upstream):
    up, refs = upstream
    root = superproject
    rc, out = rebase(root, "same-fix", up)
    assert "0003-escape-percent.patch (upstream already has this very change)" in out, out
    assert not (root / "patches" / "0003-escape-percent.patch").exists()


def test_single_quoted_package_info_gives_a_lock_core_only_setup_can_use(
    superproject, upstream, monkeypatch, capsys
):
    """REF's package_info.py writes PRE_RELEASE = '' (as upstream main does). The lock must say
    `megatron-core 0.3.0`, and `make setup` in core-only mode must accept it: download that
    release (here from the superproject's .build/dist), check the locked blobs, apply the series."""
    up, refs = upstream
    root = superproject
    rc, out = rebase(root, "release", up)
    assert rc == 0, out
    lock = P.read_lock(root / "patches")
    assert lock["megatron-core"] == "0.3.0" and lock["tag"] == "none"
    assert "megatron-core 0.3.0\n" in (root / "patches" / "upstream.lock").read_text()
    import setup_megatron as S

    monkeypatch.setattr(S, "ROOT", root)
    monkeypatch.setattr(S, "BUILD", root / ".build")
    monkeypatch.setattr(S, "CORE_COPY", root / ".build" / "megatron-core")
    applied, skipped = S.setup_core_only(lock["megatron-core"])
    assert applied == list(SERIES) and skipped == []
    core = root / ".build" / "megatron-core"
    assert "self.fluid_seen = True" in (core / MOE).read_text()
    assert "10 percent)" in (core / CFG).read_text()


@pytest.mark.parametrize(
    "text, version",
    [
        ('MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = ""\n', "0.20.0"),
        ("MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = ''\n", "0.20.0"),
        ("MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = 'rc0'  # next\n", "0.20.0rc0"),
        ("MAJOR: int = 1\nMINOR = 2\nPATCH = 3\nPRE_RELEASE = None\n", "1.2.3"),
        (
            'MAJOR = 0\nMINOR = 19\nPATCH = 1\nPRE_RELEASE = ""\nVERSION = (MAJOR, MINOR)\n'
            "__version__ = '.'.join(map(str, VERSION))\n",
            "0.19.1",
        ),
        ('__version__ = "0.4.0.dev1"\n', "0.4.0.dev1"),
    ],
)
def test_core_version_of_package_info(text, version):
    assert U.core_version_of(text) == version


def test_core_version_of_refuses_what_is_not_a_version():
    with pytest.raises(ValueError):
        U.core_version_of("MAJOR = 0\nMINOR = 20\n")
    with pytest.raises(ValueError):
        U.core_version_of("MAJOR = 0\nMINOR = 20\nPATCH = 0\nPRE_RELEASE = 'x y'\n")


def test_release_tag_names_the_version():
    """core_v0.19.0's package_info.py says 0.19.1; the 0.19.0 wheel holds the tag's core files."""
    info = 'MAJOR = 0\nMINOR = 19\nPATCH = 1\nPRE_RELEASE = ""\n'
    assert U.release_of(["core_v0.19.0"], info) == "0.19.0"
    assert U.release_of(["some-other-tag"], info) == "0.19.1"
    assert U.release_of([], info) == "0.19.1"
