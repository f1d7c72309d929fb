"""Tier: cpu. `--fluid-emulate-link-gbps` (fluid.comm.emulated_link): at EP = 1 the MoE layer's
all-to-alls, skipped without it, go through the expert-parallel CommContext, so the backward
scheduler sees windows and runs deferred dW in them; the forward takes the EP > 1 plan (one wait
for the host counts, as for split sizes over a real group); and the numbers stay those of EP = 1
bitwise (the one-rank all-to-all is a copy; deferring moves a dW in time, not its value). The
flag is refused where the link is real (EP > 1) and for values that are not a positive number.
The transfer time itself (the device wait) is checked on a GPU: tests/gpu/test_emulated_link_gpu.py.
"""

import pytest
import torch

from fluid.testing.world import single_rank_megatron


@pytest.fixture(scope="module")
def _world():
    with single_rank_megatron():
        yield


def _train(n=3, **fluid):
    """n micro-batches through the tiny 64-expert layer; main_grads, stats, outputs."""
    from fluid.testing.moe import fine_grained_test_layer, reset_ddp_flags

    layer, accs = fine_grained_test_layer(64, **fluid)  # noqa: F841 (DDP hooks)
    reset_ddp_flags(layer.parameters())
    g = torch.Generator().manual_seed(7)
    outs = []
    for _ in range(n):
        x = torch.randn(48, 1, 64, generator=g).requires_grad_(True)
        out, _ = layer(x)
        out.backward(torch.randn(48, 1, 64, generator=g))
        outs.append((out.detach(), x.grad))
    grads = {k: p.main_grad.clone() for k, p in layer.named_parameters()}
    return layer, grads, layer.scheduler.get_stats(), outs


def test_emulated_link_opens_windows_with_the_same_numbers(_world, monkeypatch):
    from fluid.moe.dispatcher import FluidTokenDispatcher

    local_plans = []
    real = FluidTokenDispatcher._finish_local_plan
    monkeypatch.setattr(
        FluidTokenDispatcher,
        "_finish_local_plan",
        lambda self, plan: local_plans.append(1) or real(self, plan),
    )
    layer, grads, stats, outs = _train(fluid_emulate_link_gbps=9.0)
    # the EP > 1 plan (one wait for the host counts per forward), not EP = 1's wait-free one
    assert local_plans == []
    comm = layer.comm
    assert comm.emulated_link is not None and comm.emulated_link.gbps == 9.0
    assert layer.token_dispatcher.dedup is False  # one rank: nothing to deduplicate
    # dispatch + combine backward of 3 micro-batches; the routed experts' dW ran inside them
    assert stats["overlapped_windows"] >= 3, stats
    assert stats["overlapped_dw_tasks"] > 0, stats

    plain_layer, plain_grads, plain_stats, plain_outs = _train()
    assert plain_layer.comm.emulated_link is None and len(local_plans) == 3
    assert plain_stats["overlapped_windows"] == 0  # no all-to-all at EP = 1: nothing to fill
    assert plain_stats["total_dw_tasks"] == stats["total_dw_tasks"]
    for (o, dx), (po, pdx) in zip(outs, plain_outs, strict=True):
        assert torch.equal(o, po) and torch.equal(dx, pdx)
    assert grads.keys() == plain_grads.keys()
    for k in grads:
        assert torch.equal(grads[k], plain_grads[k]), k


def test_emulated_link_time_model():
    from fluid.comm.emulated_link import REMOTE_SHARE, EmulatedLink

    link = EmulatedLink(9)
    # 90 MB at EP = 2: half leaves the GPU, 45 MB at 9 GB/s
    assert REMOTE_SHARE == 0.5
    assert link.seconds(90_000_000) == pytest.approx(0.005)
    for bad in (0, -1.0, "9", True, None):
        with pytest.raises(ValueError, match="--fluid-emulate-link-gbps"):
            EmulatedLink(bad)


def test_emulated_link_refused_where_the_link_is_real(_world, monkeypatch):
    import torch.distributed as dist

    from fluid.comm.context import CommContext
    from fluid.comm.emulated_link import EmulatedLink
    from fluid.config import FluidConfig, FluidConfigError
    from fluid.megatron.validate import validate_config
    from fluid.testing.moe import tiny_config

    cfg = tiny_config(use_fluid_moe=True, fluid_emulate_link_gbps=25.0)
    assert validate_config(cfg).emulate_link_gbps == 25.0
    cfg.expert_model_parallel_size = 2  # set after build: its own checks need a 2-rank world
    with pytest.raises(FluidConfigError, match="--fluid-emulate-link-gbps.*drop the flag"):
        validate_config(cfg)
    for bad in (0, -3, "fast", True):
        with pytest.raises(FluidConfigError, match="--fluid-emulate-link-gbps"):
            FluidConfig(emulate_link_gbps=bad)
    # a context of a group with more than one rank refuses it too (built by hand)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="--fluid-emulate-link-gbps.*has 2"):
        CommContext(dist.group.WORLD, emulated_link=EmulatedLink(9))


def test_status_says_the_link_is_emulated(capsys):
    import fluid
    from fluid.config import FluidConfig

    fluid.print_status(FluidConfig(emulate_link_gbps=9.0))
    assert "emulated link: expert all-to-alls as over 9 GB/s" in capsys.readouterr().out
    fluid.print_status(FluidConfig())
    assert "emulated link" not in capsys.readouterr().out
