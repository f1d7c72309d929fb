#!/usr/bin/env python3
"""`make train`: a small Mixtral-like MoE on mock data, through stock pretrain_gpt.py with
--use-fluid-moe, over all local GPUs (EP = number of GPUs, up to the 8 experts). Prints Megatron's
log (loss, iteration time, TFLOP/s) and, every log interval, the FluidMoE scheduler's stats.

Stops at once, saying what is missing, on a machine without a GPU or without the full
Megatron-LM tree (core-only mode has no pretrain_gpt.py).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=None, help="GPUs to use (default: all)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    script = ROOT / "Megatron-LM" / "pretrain_gpt.py"
    if not script.exists():
        print(
            "make train: Megatron-LM/pretrain_gpt.py is missing: `make setup` ran in core-only "
            "mode (no submodule). Run `make setup MEGATRON_LM_URL=<Megatron-LM mirror>` first.",
            file=sys.stderr,
        )
        return 2
    import torch

    if not torch.cuda.is_available():
        print("make train: no CUDA GPU on this machine; training needs at least one.", file=sys.stderr)
        return 2
    n = args.nproc or torch.cuda.device_count()
    ep = max(d for d in (1, 2, 4, 8) if d <= n and n % d == 0)
    from benchmarks.e2e import MODEL

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(script), *MODEL.format(seq=4096, iters=args.iters, warmup=min(5, args.iters - 1)).split(),
           "--expert-model-parallel-size", str(ep), "--use-fluid-moe", "--fluid-scheduler-timing"]
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0"}
    print("make train:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
