"""Tier: gpu. Wraps tests/gpu/wgrad_fused_script.py (torch's fused dW accumulation into an fp32
main_grad vs its reference and the unfused path; one GPU).

Skipped without a CUDA GPU; then runs the script and requires rc 0 (it prints PASS/FAIL per check
and states its bounds).
"""

import subprocess
import sys

from tests.gpu._torchrun import ROOT, require_gpus


def test_wgrad_fused_against_reference(tmp_path):
    require_gpus(1)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/gpu/wgrad_fused_script.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    assert proc.returncode == 0, "wgrad fused script failed (see output)"
