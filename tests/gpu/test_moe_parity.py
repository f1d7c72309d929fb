"""Tier: gpu. Wraps tests/gpu/moe_parity_script.py (stock MoELayer vs FluidMoELayer, bf16, EP=4,
or EP=2 on a 2-GPU host).

Skipped unless 2 CUDA GPUs are visible; then runs the script under torchrun on 4 GPUs (2 if only
2 are visible) and requires rc 0 (the script prints PASS/FAIL per check and states its tolerance).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 or 4 CUDA GPUs"
)
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_swiglu"])
def test_moe_parity_with_stock(tmp_path, fused):
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", NCCL_NVLS_ENABLE="0")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4" if torch.cuda.device_count() >= 4 else "2",
        str(ROOT / "tests/gpu/moe_parity_script.py"),
        "--out",
        str(tmp_path),
    ] + (["--fused"] if fused else [])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    assert proc.returncode == 0, "moe parity script failed (see output)"
