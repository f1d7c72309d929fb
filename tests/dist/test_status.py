"""Tier: dist (one gloo rank). `fluid.status()` / `print_status()`: the pin read from
patches/upstream.lock, the scheduler switches, and whether dW is deferred at all given the
CommContexts built so far (inline when none overlaps: the auto policy on one NVLink node), and
whether deterministic algorithms are on (FluidMoE's SDPA attention repeats bit for bit only then)."""

import torch.distributed as dist

from tests._dist import run_distributed


def _body(rank, world):
    import fluid
    from fluid.comm import CommContext
    from fluid.schedule import get_backward_scheduler

    s = fluid.status()
    assert s["upstream"]["commit"] == "5be9626709af2722333bf54797c954c09edeada3"
    assert s["upstream"]["tag"] == "core_v0.19.0"
    assert s["scheduler"]["enabled"] is True
    assert s["scheduler"]["defers_dw"] is True  # no CommContext yet: nothing rules deferral out

    sched = get_backward_scheduler()
    never = CommContext(dist.group.WORLD, overlap="never")
    s = fluid.status()
    assert s["scheduler"]["comm_groups"] == 1 and s["scheduler"]["defers_dw"] is False
    always = CommContext(dist.group.WORLD, overlap="always")
    assert fluid.status()["scheduler"]["defers_dw"] is True
    del always
    import gc

    gc.collect()  # the scheduler holds contexts weakly: a dropped one no longer counts
    assert fluid.status()["scheduler"]["defers_dw"] is False
    sched.disable()
    assert fluid.status()["scheduler"]["defers_dw"] is False
    sched.enable()
    printed = fluid.print_status()
    assert printed["scheduler"]["comm_groups"] == 1
    assert printed["scheduler"]["sm_carveout"] == "auto" and printed["moe"]["dedup"] == "auto"
    assert printed["moe"]["grouped_mm"] == "auto"
    import torch

    assert printed["deterministic_algorithms"] is False
    torch.use_deterministic_algorithms(True)  # what Megatron's --deterministic-mode turns on
    try:
        assert fluid.status()["deterministic_algorithms"] is True
    finally:
        torch.use_deterministic_algorithms(False)
    del never


def test_status_reports_pin_and_deferral():
    run_distributed(_body, 1)
