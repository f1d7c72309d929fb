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


def train_argv(script: Path, nproc: int, iters: int) -> list[str]:
    """torchrun over `nproc` GPUs of `pretrain_gpt.py` with the benchmarks' small 8-expert model
    (benchmarks/recipes.py `small`, arguments from benchmarks/e2e_job.py), EP = the largest of
    1, 2, 4, 8 that divides `nproc`, Fluid on with the scheduler's timing."""
    from benchmarks import recipes
    from benchmarks.e2e_job import model_args

    ep = max(d for d in (1, 2, 4, 8) if d <= nproc and nproc % d == 0)
    recipe = recipes.E2ERecipe("train", "small", "make train", nproc=nproc, ep=ep)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *model_args(recipe, iters),
        "--use-fluid-moe",
        "--fluid-scheduler-timing",
    ]


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
        print(
            "make train: no CUDA GPU on this machine; training needs at least one.", file=sys.stderr
        )
        return 2
    n = args.nproc or torch.cuda.device_count()
    cmd = train_argv(script, n, args.iters)
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0"}
    print("make train:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
