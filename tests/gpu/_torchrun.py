"""Run a GPU script under torchrun from a pytest test (tier gpu); skip without enough GPUs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def require_gpus(n: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("tier gpu: no CUDA device on this machine")
    if torch.cuda.device_count() < n:
        pytest.skip(f"tier gpu: needs {n} GPUs, found {torch.cuda.device_count()}")


def torchrun(script: str, nproc: int, *args: str, env: dict | None = None, timeout: int = 600):
    """Run tests/gpu/<script> on `nproc` GPUs; returns the CompletedProcess (output captured)."""
    full_env = {
        **os.environ,
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(ROOT / "tests" / "gpu" / script),
        *args,
    ]
    res = subprocess.run(
        cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    print(res.stdout[-6000:])
    print(res.stderr[-6000:], file=sys.stderr)
    return res
