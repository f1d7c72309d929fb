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
from upstream_fixture import MOE, TOOLS, make_superproject, make_upstream  # noqa: E402

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
        [sys.executable, str(TOOLS / "diff_report.py"), "--tree", str(up), "--patches",
         str(root / "patches"), "--overlay", str(root / "overlay" / "fluid"), "--out", str(out),
         *args],
        capture_output=True, text=True,
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


def _index_reachable() -> bool:
    try:
        U.latest_core_version()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _index_reachable(), reason="the package index is not reachable")
def test_latest_core_version_from_index():
    v = U.latest_core_version()
    assert U.VERSION_RE.match(v), v
    assert tuple(int(x) for x in v.split(".")[:2]) >= (0, 19), v
