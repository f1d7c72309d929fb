"""Tier: cpu. `tools/diff_report.py` and the CI wrapper's pass/fail rule, on the synthetic upstream.

Offline except `test_latest_core_version_from_index`, which needs the package index and skips
with a reason when it cannot be reached.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fixture module beside us
from upstream_fixture import CFG, MOE, TOOLS, make_superproject, make_upstream, sh  # noqa: E402

sys.path.insert(0, str(TOOLS))
import upstream_src as U  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dr")
    up = base / "Megatron-LM.git"
    refs = make_upstream(up)
    root = make_superproject(base / "super", up, refs["pin"])
    return up, refs, root


def report(up, root, tmp_path, *args):
    out = tmp_path / "report.md"
    res = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "diff_report.py"),
            "--tree",
            str(up),
            "--patches",
            str(root / "patches"),
            "--overlay",
            str(root / "overlay" / "fluid"),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    return res.returncode, res.stdout + res.stderr, out.read_text() if out.exists() else ""


def test_report_on_a_conflicting_upstream(setup, tmp_path):
    up, refs, root = setup
    rc, log, md = report(up, root, tmp_path, "--from", "0.1.0", "--to", "conflict", "--check-pin")
    assert rc == 0, log  # upstream moving on is not a failure; the series still fits the pin
    assert "mode: full tree (git)" in md
    assert "does NOT apply: 0002-moe-hook.patch" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 0002-moe-hook.patch"))
    assert "| conflict" in row and f"{MOE}: hunk @@ -" in row, row
    assert re.search(r"\| 0001-config-flag.patch \| ok \| clean \|", md)
    # every patch gets an outcome: the one after the conflict was tried too
    assert re.search(r"\| 0003-escape-percent.patch \| ok \| clean \|", md)
    # the moe/ section: git's stat line and the changed symbol
    assert "megatron/core/transformer/moe/moe_layer.py | 2 +-" in md
    assert "`MoELayer.forward`: +1 -1 (1 hunk)" in md
    assert "## API check" in md


def test_report_on_a_clean_upstream(setup, tmp_path):
    up, refs, root = setup
    rc, log, md = report(up, root, tmp_path, "--to", "0.2.0")  # FROM defaults to the pin
    assert rc == 0, log
    assert "every patch applies (clean)" in md
    assert "| compatible | `megatron.core.transformer.moe.moe_layer.MoELayer.forward`" in md
    assert "new optional parameter: inference_context=None" in md


def test_scratch_takes_each_side_whole(setup, tmp_path, monkeypatch):
    """The scratch repository's TO commit holds TO's files, also a file whose size and mtime
    second are FROM's: `git archive` stamps each file with its commit's time, and the fixture's
    commits share one second, as release commits can. Git trusts the stat data in its index;
    core.checkStat=minimal makes it trust size and mtime alone, which it otherwise does whenever
    inode and ctime happen to match too (about 1 run in 3 before the fix)."""
    up, refs, root = setup
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.checkStat")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "minimal")
    at = {ref: sh(up, "git", "show", f"{refs[ref]}:{MOE}") for ref in ("pin", "conflict")}
    assert at["pin"] != at["conflict"] and len(at["pin"]) == len(at["conflict"])
    assert len({sh(up, "git", "log", "-1", "--format=%ct", refs[r]) for r in at}) == 1
    old, new = U.resolve_side("0.1.0", up), U.resolve_side("conflict", up)
    for i in range(3):
        sc = U.build_scratch(old, new, up, [], tmp_path / f"scratch{i}")
        assert U.git(sc.repo, "show", f"{sc.new}:{MOE}").strip() == at["conflict"]
        assert U.git(sc.repo, "diff", "--name-only", sc.old, sc.new).split() == [MOE]


def test_report_on_an_upstream_that_fixed_a_patch_its_own_way(setup, tmp_path):
    """Upstream fixed 0003's bug with "10%%)" where 0003 writes "10 percent)": textually a
    conflict, yet the patch is not needed: "fixed upstream: drop it", not "does NOT apply"."""
    up, refs, root = setup
    rc, log, md = report(up, root, tmp_path, "--to", "fixed")
    assert rc == 0, log
    assert "does NOT apply" not in md
    assert (
        "applies without the patches fixed upstream (clean); fixed upstream, drop: "
        "0003-escape-percent.patch" in md
    )
    row = next(ln for ln in md.splitlines() if ln.startswith("| 0003-escape-percent.patch"))
    assert (
        "| fixed upstream: drop it (upstream fixed the bug its own way: probe "
        "tools/probes.py:percent_safe_config_help no longer finds moe_buffer_factor) |" in row
    ), row
    # upstream's new instance of the same bug is named beside it
    assert "upstream has the bug elsewhere, which this patch does not fix" in row
    assert f"{CFG}:" in row and "moe_block" in row
    assert "0003-escape-percent.patch fixed upstream: drop it" in log  # the one-line summary


def test_report_on_an_upstream_that_made_the_same_change(setup, tmp_path):
    up, refs, root = setup
    rc, log, md = report(up, root, tmp_path, "--to", "same-fix")
    assert rc == 0, log
    row = next(ln for ln in md.splitlines() if ln.startswith("| 0003-escape-percent.patch"))
    assert "fixed upstream: drop it (upstream already has this very change)" in row, row


def test_check_pin_fails_only_when_the_series_breaks_on_the_pin(setup, tmp_path):
    up, refs, root = setup
    bad = tmp_path / "super"
    subprocess.run(["cp", "-r", str(root), str(bad)], check=True)
    lock = (bad / "patches" / "upstream.lock").read_text()
    blob = re.search(r"^([0-9a-f]{40}) " + re.escape(MOE), lock, re.M).group(1)
    (bad / "patches" / "upstream.lock").write_text(lock.replace(blob, "0" * 40))
    rc, log, md = report(up, bad, tmp_path, "--to", "0.2.0", "--check-pin")
    assert rc == 1 and "no longer applies to the pin" in log, log
    assert "The series on the pin" in md and "FAILS" in md


def test_latest_core_version_from_index():
    try:
        v = U.latest_core_version()
    except Exception as e:  # asked here, not at collection, so deselecting it costs nothing
        pytest.skip(f"the package index is not reachable: {e}")
    assert U.VERSION_RE.match(v), v
    assert tuple(int(x) for x in v.split(".")[:2]) >= (0, 19), v
