"""Tier: dist (one gloo rank). `fluid.status()` / `print_status()`: the pin read from
patches/upstream.lock, the scheduler switches, and whether dW is deferred at all given the
CommContexts built so far (inline when none overlaps: the auto policy on one NVLink node), and
whether deterministic algorithms are on (FluidMoE's SDPA attention repeats bit for bit only then)."""

from pathlib import Path

import torch.distributed as dist

from tests._dist import run_distributed

LOCK = Path(__file__).resolve().parents[2] / "patches" / "upstream.lock"


def _pin_from_lock() -> dict:
    """commit, tag and megatron-core as patches/upstream.lock's `<key> <value>` lines give them."""
    lines = [ln.split() for ln in LOCK.read_text().splitlines() if ln.strip() and ln[0] != "#"]
    pin = {ln[0]: ln[1] for ln in lines if ln[0] in ("commit", "tag", "megatron-core")}
    assert len(pin) == 3 and len(pin["commit"]) == 40, pin
    return pin


def _body(rank, world):
    import fluid
    from fluid.comm import CommContext
    from fluid.schedule import get_backward_scheduler

    s = fluid.status()
    assert s["upstream"] == _pin_from_lock()  # whatever the lock says, not a copy of it
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
