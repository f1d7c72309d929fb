"""Tier: gpu (2+ GPUs). A queued dW runs while the backward all-to-all is in flight, making the
step faster than the scheduler off, with identical gradients (tests/gpu/scheduler_overlap.py,
over the slow link NCCL_P2P_DISABLE=1 where FluidMoE's policy overlaps)."""

import torch

from tests.gpu._torchrun import require_gpus, torchrun


def test_dw_overlaps_backward_all_to_all():
    require_gpus(2)
    n = min(4, torch.cuda.device_count())
    res = torchrun("scheduler_overlap.py", n, env={"NCCL_P2P_DISABLE": "1"})
    assert res.returncode == 0, "see PASS/FAIL lines above"
    assert "PASS: dW ran inside a2a windows" in res.stdout
