"""Tier: dist (gloo, 2 processes via torchrun). The GPU parity script (tests/gpu/moe_parity_script.py)
in its CPU dry run, with a benchmark model's layer shape (`--model fine`: 64 experts top-6 and a
shared expert, small widths on CPU): the Fluid code paths it drives run and the scheduler on/off
outputs and gradients are bit-identical (the stock side needs CUDA and is skipped there). Keeps
the multi-GPU runs' `--model NAME --basic` command from failing on an argument or a shape.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_parity_script_dry_run_with_a_recipe_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "tests" / "gpu" / "moe_parity_script.py"),
        "--device",
        "cpu",
        "--model",
        "fine",
        "--basic",
        "--out",
        str(tmp_path),
    ]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "[moe parity] PASS (0 failed, device=cpu, ws=2)" in out, out[-4000:]
    assert "scheduler on == off (bitwise)" in out and "FAIL" not in out.replace("0 failed", "")
