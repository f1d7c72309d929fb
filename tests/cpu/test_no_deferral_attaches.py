"""Tier: cpu. A Fluid op whose scheduler would defer nothing takes its weights as autograd inputs
(`fluid.schedule.wgrad.weights_attached`), as with the scheduler off.

Why: with the scheduler on but no all-to-all able to take dW beside it (the auto policy over
NVLink), every dW runs inline anyway; handing it over through `accumulate_weight_grad` costs one
nested engine call per parameter, which made Fluid 11% slower than Fluid with the scheduler off on
the host-bound 64-expert model over NVLink (docs/benchmarks/overlap.md). What must hold:
  - `weights_attached` follows `BackwardScheduler.defers_dw`: attached when disabled or when every
    registered CommContext says no overlap; detached when one says yes, or when none is registered
    (deferred linears used alone);
  - with a no-overlap policy, `deferred_linear` and `grouped_linear` make no hand-over at all and
    give gradients bit-identical to the scheduler off (same ops by construction: torch.equal),
    into `param.grad` and, under a Megatron-DDP-like hook, into the fp32 `main_grad`;
  - with an overlap policy they do hand over (the counter can see it), same values.
"""

import pytest
import torch

import fluid.schedule.wgrad as wgrad
from fluid.moe.grouped_gemm import grouped_linear
from fluid.schedule import deferred_linear
from fluid.schedule.scheduler import BackwardScheduler
from fluid.testing.autograd import PolicyComm


def _scheduler(kind: str):
    """(scheduler, the comm kept alive: register_comm holds it weakly)."""
    if kind == "off":
        return BackwardScheduler(enabled=False), None
    sched = BackwardScheduler()
    comm = None
    if kind in ("no_overlap", "overlap"):
        comm = PolicyComm(kind == "overlap")
        sched.register_comm(comm)
    return sched, comm


@pytest.mark.parametrize(
    "kind, attached",
    [("off", True), ("no_overlap", True), ("overlap", False), ("no_comm", False)],
)
def test_weights_attached_follows_defers_dw(kind, attached):
    sched, _comm = _scheduler(kind)
    assert wgrad.weights_attached(sched) is attached
    assert sched.defers_dw() is not attached


@pytest.fixture
def hand_overs(monkeypatch):
    calls = []
    real = wgrad._hand_over

    def counting(param, box):
        calls.append(param)
        real(param, box)

    monkeypatch.setattr(wgrad, "_hand_over", counting)
    return calls


def _params(ddp: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(24, 16, generator=g))
    b = torch.nn.Parameter(torch.randn(24, generator=g))
    gw = torch.nn.Parameter(torch.randn(3, 20, 16, generator=g))  # 3 groups, [N, K] each
    params = (w, b, gw)
    if ddp:  # Megatron DDP: fp32 main_grad, a hook on AccumulateGrad that adds and clears grad
        for p in params:
            p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            p.grad_added_to_main_grad = False

            def hook(*_, p=p):
                if p.grad is not None and not p.grad_added_to_main_grad:
                    p.main_grad.add_(p.grad)
                p.grad = None

            acc = p.expand_as(p).grad_fn.next_functions[0][0]
            acc.register_hook(hook)
            p._fluid_test_acc = acc  # keep the node (and its hook) alive
    return params


def _step(kind: str, ddp: bool):
    """Two micro-batches through deferred_linear and grouped_linear; returns the gradients."""
    sched, comm = _scheduler(kind)
    w, b, gw = _params(ddp)
    for mb in range(2):
        g = torch.Generator().manual_seed(10 + mb)
        x = torch.randn(7, 16, generator=g, requires_grad=True)
        xt = torch.randn(9, 16, generator=g, requires_grad=True)
        y = deferred_linear(x, w, b, name="lin", scheduler=sched)
        z = grouped_linear(xt, gw, [4, 0, 5], None, name="experts", scheduler=sched)
        (y.square().sum() + z.square().sum()).backward()
        sched.flush()
    assert sched.num_pending == 0 and comm is comm
    return [(p.main_grad if ddp else p.grad).clone() for p in (w, b, gw)]


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp_main_grad"])
def test_no_overlap_policy_hands_nothing_over_and_matches_scheduler_off(ddp, hand_overs):
    ref = _step("off", ddp)
    assert hand_overs == []
    got = _step("no_overlap", ddp)
    assert hand_overs == [], f"{len(hand_overs)} hand-over(s) with nothing to defer into"
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g)


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp_main_grad"])
def test_overlap_policy_still_hands_over_same_values(ddp, hand_overs):
    ref = _step("off", ddp)
    got = _step("overlap", ddp)
    # w, b, gw per micro-batch
    assert len(hand_overs) == 6
    for r, g in zip(ref, got, strict=True):
        assert torch.equal(r, g)
