"""Tier: dist (2 and 4 gloo ranks on CPU). The BackwardScheduler on a stack of Fluid linears with
all-to-alls between them:
  - gradients with the scheduler enabled equal disabled exactly (torch.equal), and equal a plain
    single-process PyTorch reference within fp32 tolerance;
  - dW tasks run in the windows claimed (the last layer's dW in the first backward all-to-all's
    window, the first layer's at the end-of-backward flush);
  - a Megatron-DDP-style grad-accumulator hook fires exactly once per parameter per backward, with
    the gradient already there (what overlap_grad_reduce relies on);
  - an exception in backward leaves no stale task that pollutes the next step;
  - two micro-batches accumulate.

Tolerance vs the reference: fp32 with the same GEMMs but a different evaluation order (the
reference computes the global batch in one process), so rounding differs at the 1e-6 relative
level; rtol=1e-5, atol=1e-6 leaves margin yet catches any missing or doubled contribution.
"""

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

D = 8  # feature size
N = 3  # rows each rank sends to each rank


def _model(world):
    g = torch.Generator().manual_seed(1234)
    w1 = torch.nn.Parameter(torch.randn(D, D, generator=g) / D**0.5)
    w2 = torch.nn.Parameter(torch.randn(D, D, generator=g) / D**0.5)
    b2 = torch.nn.Parameter(torch.randn(D, generator=g))
    return w1, w2, b2


def _inputs(rank, world, step):
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randn(N * world, D, generator=g), torch.randn(N * world, D, generator=g)


def _forward(comm, params, x, c):
    from fluid.comm import fluid_all_to_all
    from fluid.schedule import deferred_linear

    w1, w2, b2 = params
    h = deferred_linear(x, w1, name="l1")
    h = fluid_all_to_all(comm, torch.relu(h))
    h = deferred_linear(h, w2, b2, name="l2")
    h = fluid_all_to_all(comm, h)
    return (h * c).sum()


def _reference(world, steps):
    """Single process: every rank's computation with its own copy of the weights."""
    grads = []
    for rank in range(world):
        w1, w2, b2 = (p.detach().clone().requires_grad_(True) for p in _model(world))
        total = 0.0
        for step in range(steps):
            xs = [_inputs(r, world, step) for r in range(world)]
            # Layer 1 on every rank, all-to-all by reindexing, layer 2 on `rank`, all-to-all back.
            h1 = [
                torch.relu(x @ (w1 if r == rank else w1.detach()).t())
                for r, (x, _) in enumerate(xs)
            ]
            recv = [
                torch.cat([h1[s][d * N : (d + 1) * N] for s in range(world)]) for d in range(world)
            ]
            h2 = [
                r_in @ (w2 if d == rank else w2.detach()).t() + (b2 if d == rank else b2.detach())
                for d, r_in in enumerate(recv)
            ]
            back = [
                torch.cat([h2[s][d * N : (d + 1) * N] for s in range(world)]) for d in range(world)
            ]
            total = total + sum((back[r] * xs[r][1]).sum() for r in range(world))
        total.backward()
        grads.append((w1.grad, w2.grad, b2.grad))
    return grads


def _run(comm, params, rank, world, steps, enabled, hook_log=None):
    from fluid.schedule import get_backward_scheduler

    sched = get_backward_scheduler()
    sched.enable() if enabled else sched.disable()
    for p in params:
        p.grad = None
    for step in range(steps):
        x, c = _inputs(rank, world, step)
        _forward(comm, params, x.requires_grad_(True), c).backward()
        assert sched.num_pending == 0
    return tuple(p.grad.clone() for p in params)


def _ddp_style_hooks(params, log):
    """Megatron DDP's pattern: a hook on each param's AccumulateGrad node moves .grad into
    main_grad (unless dW already went there: grad_added_to_main_grad, the fused path of
    --fluid-wgrad-accumulation); with overlap_grad_reduce it then reports the param ready to its
    bucket."""
    accs = []
    for p in params:
        p.main_grad = torch.zeros_like(p)
        p.grad_added_to_main_grad = False

        def hook(*_, p=p):
            assert p.grad is not None, "hook fired before the dW landed"
            if not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)
            p.grad = None
            log.append(id(p))

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        accs.append(acc)
    return accs


def _body(rank, world):
    from fluid.comm import CommContext
    from fluid.schedule import get_backward_scheduler

    comm = CommContext(dist.group.WORLD, overlap="always")
    sched = get_backward_scheduler()
    params = _model(world)

    # 1. On == off bit for bit, over two accumulated micro-batches; both equal the reference.
    on = _run(comm, params, rank, world, steps=2, enabled=True)
    off = _run(comm, params, rank, world, steps=2, enabled=False)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    ref = _reference(world, steps=2)[rank]
    for a, r in zip(on, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    one = _run(comm, params, rank, world, steps=1, enabled=True)
    assert not torch.allclose(one[0], on[0])  # the second micro-batch really contributed

    # 2. Windows: l2's dW (queued first in backward) runs while the all-to-all between the layers
    #    is in flight; l1's dW has no all-to-all after it and is flushed at the end of backward.
    sched.enable()
    sched.reset_stats()
    sched.trace = []
    x, c = _inputs(rank, world, 0)
    _forward(comm, params, x.requires_grad_(True), c).backward()
    assert sched.trace == [("l2", "overlapped"), ("l1", "flushed")], sched.trace
    st = sched.get_stats()
    assert st["total_dw_tasks"] == st["completed_dw_tasks"] == 2
    assert st["overlapped_dw_tasks"] == 1 and st["flushed_dw_tasks"] == 1
    assert st["a2a_calls"] == 2 and st["pending_dw_tasks"] == 0
    #    With overlap off (the NVLink policy) the same task runs right after the wait instead.
    sched.trace = []
    comm_short = CommContext(dist.group.WORLD, overlap="never")
    _forward(comm_short, params, x, c).backward()
    assert sched.trace == [("l2", "after_wait"), ("l1", "flushed")], sched.trace
    #    A window below min_window_bytes is skipped: l2's dW waits for the next window (here the
    #    end-of-backward flush), as the MoE probs all-to-all defers to the token all-to-all.
    sched.trace = []
    sched.reset_stats()
    comm_min = CommContext(dist.group.WORLD, overlap="always", min_window_bytes=1 << 30)
    _forward(comm_min, params, x, c).backward()
    assert sched.trace == [("l2", "flushed"), ("l1", "flushed")], sched.trace
    assert sched.get_stats()["skipped_windows"] == 1
    #    When no live CommContext overlaps (every group on a fast link under the auto policy),
    #    deferring cannot pay: dW runs inline in its op's backward, as with the scheduler off.
    live = sched._comms
    assert {comm, comm_short, comm_min} <= set(live)  # every CommContext registered itself
    sched._comms = __import__("weakref").WeakSet([comm_short])
    assert not sched.overlap_possible()
    sched.trace = []
    for p in params:
        p.grad = None
    _forward(comm_short, params, x, c).backward()
    assert sched.trace == [("l2", "inline"), ("l1", "inline")], sched.trace
    assert all(torch.equal(p.grad, g) for p, g in zip(params, one, strict=True))
    sched._comms = live
    assert sched.overlap_possible()
    sched.trace = None

    # 3. DDP-style hooks: once per parameter per backward, after the gradient exists, and the
    #    accumulated main_grad equals the plain gradients.
    log = []
    accs = _ddp_style_hooks(params, log)
    for p in params:
        p.grad = None
    for step in range(2):
        x, c = _inputs(rank, world, step)
        _forward(comm, params, x.requires_grad_(True), c).backward()
        assert sorted(log) == sorted(id(p) for p in params), "one hook call per param"
        log.clear()
    for p, expect in zip(params, on, strict=True):
        assert p.grad is None
        torch.testing.assert_close(p.main_grad, expect, rtol=1e-6, atol=1e-7)
    del accs
    for p in params:
        del p.main_grad, p.grad_added_to_main_grad

    # 4. A failing dW task clears the queue; a failure elsewhere leaves stale tasks that the next
    #    forward drops; the next step's gradients are exact.
    def bad():
        raise RuntimeError("boom in dW")

    class FailAfterQueue(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            sched.defer(bad, "bad")  # queued now, raises when a window runs it
            return g

    for p in params:
        p.grad = None
    x, c = _inputs(rank, world, 0)
    loss = _forward(comm, params, FailAfterQueue.apply(x.requires_grad_(True)), c)
    with pytest.raises(RuntimeError, match="boom in dW"):
        loss.backward()
    assert sched.num_pending == 0

    class FailUpstream(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom upstream")

    for p in params:
        p.grad = None
    loss = _forward(comm, params, FailUpstream.apply(x), c)
    with pytest.raises(RuntimeError, match="boom upstream"):
        loss.backward()
    assert sched.num_pending == 1  # l1's dW, queued before the failing op ran
    sched.on_forward()  # what every Fluid layer calls first in forward
    assert sched.num_pending == 0 and sched.get_stats()["dropped_stale_tasks"] >= 1
    after = _run(comm, params, rank, world, steps=2, enabled=True)
    for a, b in zip(after, on, strict=True):
        assert torch.equal(a, b)

    # 5. Reentrant activation checkpointing (what --recompute-granularity full does): a recomputed
    #    layer's backward is a nested graph task that defers its dW while the outer backward's dW
    #    (the plain layer above it) is still queued; neither may be lost or dropped.
    from fluid.comm import fluid_all_to_all
    from fluid.schedule import deferred_linear

    def recompute_step(use_ckpt):
        for p in params:
            p.grad = None
        x, c = _inputs(rank, world, 0)
        x.requires_grad_(True)
        lin0 = lambda h, w: deferred_linear(h, w, name="recomputed")  # noqa: E731
        h = (
            torch.utils.checkpoint.checkpoint(lin0, x, params[0], use_reentrant=True)
            if use_ckpt
            else lin0(x, params[0])
        )
        h = fluid_all_to_all(comm, deferred_linear(torch.relu(h), params[1], name="plain"))
        (h * c).sum().backward()
        assert sched.num_pending == 0
        return [p.grad.clone() for p in params[:2]]

    sched.reset_stats()
    for a, b in zip(recompute_step(True), recompute_step(False), strict=True):
        assert torch.equal(a, b)
    assert sched.get_stats()["dropped_stale_tasks"] == 0

    # 6. Timing on CPU: wall-clock window stats are reported.
    sched.set_timing(True)
    sched.reset_stats()
    _run(comm, params, rank, world, steps=1, enabled=True)
    st = sched.get_stats()
    assert st["window_ms"] > 0 and st["dw_in_window_ms"] > 0
    sched.set_timing(False)


@pytest.mark.parametrize("world", [2, 4])
def test_scheduler_on_off_reference_windows_hooks_failures(world):
    run_distributed(_body, world)
