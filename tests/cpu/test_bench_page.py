"""Tier: cpu. docs/benchmarks/README.md is the render of the committed raw JSON
(docs/benchmarks/raw/<recipe>.json): regenerated here and diffed, so the page cannot drift from
the JSON it cites. And the README's performance section cites no number the page lacks."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_page_is_the_render_of_the_raw_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.render", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_readme_performance_numbers_are_on_the_page():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Performance\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README.md has a '## Performance' section"
    page = (ROOT / "docs" / "benchmarks" / "README.md").read_text()
    for num in re.findall(r"\d+\.\d+x", m.group(1)):
        assert num in page, f"README cites {num}, which docs/benchmarks/README.md does not show"


def test_one_gpu_overlap_ratio_is_labelled_spread():
    """On one GPU Fluid with and without the scheduler run the same operations (no all-to-all,
    every dW inline), so the page must not present their ratio as overlap; over an emulated link
    (fluid.comm.emulated_link) the all-to-alls exist and the ratio is the overlap. The one-GPU
    `nvlink` link is named as no link at all."""
    from benchmarks import recipes as R
    from benchmarks.render import _link_name, _overlap

    one = R.RECIPES["e2e_fine_1gpu"]
    two = R.RECIPES["e2e_fine_ep2"]
    emul = R.RECIPES["e2e_fine_1gpu_emul"]
    ls = {"overlap": {"median": 1.091, "min": None, "max": None}}
    assert one.nproc == 1 and "run-to-run spread" in _overlap(one, ls, "nvlink")
    assert two.nproc == 2 and _overlap(two, ls, "nvlink") == "1.091x"
    assert _overlap(one, {}, "nvlink") == "-"
    assert "run-to-run spread" in _overlap(emul, ls, "nvlink")
    assert _overlap(emul, ls, "emul25") == "1.091x"
    assert _link_name(one, "nvlink").startswith("none") and _link_name(two, "nvlink") == "NVLink"
    assert _link_name(emul, "emul9") == "emulated, 9 GB/s (one GPU)"
