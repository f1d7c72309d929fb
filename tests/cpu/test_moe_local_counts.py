"""Tier: cpu. At EP = 1 the MoE layer's forward never waits for the device (HostCounts).

With one chunk and dropless routing at EP = 1 nothing is sent, so the dispatcher's plan gives the
grouped GEMM device offsets and the experts a HostCounts that reads the host counts only where a
value is used (fluid.moe.counts). Before, the forward waited for the counts' device->host copy
once per layer; on the host-bound 64-expert model the GPU then idled while the host queued the
rest of the layer (docs/benchmarks/breakdown.md).

CPU stands in for the GPU path: `torch._grouped_mm` runs on CPU in this torch, so the grouped
path is forced (`_grouped_mm_supported`) and offsets are made as on CUDA (int32 tensors). Checked:
(1) no host count is read during the forward, on the grouped path, with the scheduler on and off;
(2) the values (output, dX, every parameter's main_grad) equal, bitwise, the same layer built on
the host-count plan: both run the same kernels with the same offsets by construction, only the
plan that supplies them differs; 64 experts over 48 tokens top-6 leave experts empty, so
backward's zeroing of their dW (which reads the counts) is covered.
"""

import pytest
import torch

from fluid.testing.world import single_rank_megatron


@pytest.fixture(scope="module", autouse=True)
def _world():
    with single_rank_megatron():
        yield


def _cpu_offsets(counts, device=None):
    """offsets as on the GPU: an int32 cumulative tensor (offsets_for / local_offsets give None
    on CPU, which selects the per-expert loop)."""
    if isinstance(counts, torch.Tensor):
        return torch.cumsum(counts, 0, dtype=torch.int32)
    return torch.tensor(list(torch.tensor(list(counts)).cumsum(0)), dtype=torch.int32)


def _run(monkeypatch, local_plan: bool, scheduler_on: bool):
    import fluid.moe.counts as counts_mod
    import fluid.moe.dispatcher as dispatcher
    import fluid.moe.grouped_gemm as gg
    from fluid.testing.moe import fine_grained_test_layer, reset_ddp_flags

    monkeypatch.setattr(gg, "_grouped_mm_supported", lambda x: True)
    monkeypatch.setattr(dispatcher, "local_offsets", _cpu_offsets)
    monkeypatch.setattr(dispatcher, "offsets_for", _cpu_offsets)
    if not local_plan:
        monkeypatch.setattr(dispatcher.FluidTokenDispatcher, "_local_plan_applies", lambda s: False)
    reads = {"forward": 0, "backward": 0}
    phase = ["forward"]
    real_get = counts_mod.PendingCounts.get

    def get(self):
        reads[phase[0]] += 1
        return real_get(self)

    monkeypatch.setattr(counts_mod.PendingCounts, "get", get)

    H = 64
    layer, accs = fine_grained_test_layer(H, fluid_grouped_gemm="on")  # noqa: F841  (DDP hooks)
    sched = layer.scheduler
    sched.enable() if scheduler_on else sched.disable()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 1, H, generator=g).requires_grad_(True)
    dy = torch.randn(48, 1, H, generator=g)
    try:
        reset_ddp_flags(layer.parameters())
        phase[0] = "forward"
        out, _ = layer(x)
        phase[0] = "backward"
        out.backward(dy)
    finally:
        sched.enable()
    grads = {n: p.main_grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad.clone(), grads, reads


@pytest.mark.parametrize("scheduler_on", [True, False], ids=["sched_on", "sched_off"])
def test_ep1_forward_reads_no_host_counts_and_matches_the_host_plan(monkeypatch, scheduler_on):
    out, dx, grads, reads = _run(monkeypatch, True, scheduler_on)
    assert reads["forward"] == 0, reads  # before: 1 per layer forward (the wait)
    assert reads["backward"] >= 1, reads  # empty experts' dW zeroed from the host counts
    with pytest.MonkeyPatch.context() as mp:
        ref_out, ref_dx, ref_grads, ref_reads = _run(mp, False, scheduler_on)
    assert ref_reads["forward"] >= 1, ref_reads  # the host plan does read them in the forward
    assert torch.equal(out, ref_out)
    assert torch.equal(dx, ref_dx)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    empty = (grads["experts.weight1"].flatten(1).abs().sum(1) == 0).sum().item()
    assert empty > 0  # some experts got no rows: their zeroed dW is part of what matched
