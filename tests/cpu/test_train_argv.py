"""Tier: cpu. `make train`'s command line (tools/train.py `train_argv`): torchrun of
pretrain_gpt.py with the benchmarks' small 8-expert model, EP from the GPU count, Fluid on. Built
without a GPU; the flags are the ones benchmarks/e2e_job.py gives the same model (it imported a
module that no longer existed, benchmarks.e2e, so `make train` failed on every GPU host)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import train  # noqa: E402  (tools/ is a script folder, not a package)


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("nproc,ep", [(1, 1), (2, 2), (4, 4), (6, 2), (8, 8)])
def test_train_argv(nproc, ep):
    script = ROOT / "Megatron-LM" / "pretrain_gpt.py"
    argv = train.train_argv(script, nproc, iters=7)
    assert argv[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    assert argv[5] == str(script)
    assert _flag(argv, "--expert-model-parallel-size") == str(ep)
    assert _flag(argv, "--num-experts") == "8" and _flag(argv, "--moe-router-topk") == "2"
    assert _flag(argv, "--train-iters") == "7"
    assert argv.count("--expert-model-parallel-size") == 1
    assert argv[-2:] == ["--use-fluid-moe", "--fluid-scheduler-timing"]
