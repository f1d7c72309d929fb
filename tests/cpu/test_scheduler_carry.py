"""Tier: cpu. Carried dW tasks (`BackwardScheduler.defer(..., carry=n)`): a task deferred with
carry n lets n all-to-all windows pass and runs in the next one, in queue order with the tasks due
there; the end-of-backward flush runs it regardless; a window whose queue holds only carried tasks
runs nothing and counts for them; a window too small to fill (below min_window_bytes) does not
count; a raising task's discard counts the carried tasks too (stats balance). FluidMoELayer uses
carry 1 for its shared experts' linears (tests/dist/test_moe_layer.py checks the wiring).

Windows are driven by hand with a CPU stand-in for an all-to-all handle and its CommContext, from
inside an autograd backward (the scheduler queues only there).
"""

import pytest
import torch

from fluid.schedule.scheduler import BackwardScheduler
from fluid.testing.autograd import PolicyComm, backward_op


class _Handle:
    def __init__(self, nbytes=1 << 20):
        self.nbytes, self.done, self.start_event, self.waited = nbytes, None, None, False

    def wait(self):
        self.waited = True


def _backward_running(sched, steps):
    """Run `steps` (callables taking the scheduler) inside one backward pass."""

    def run_steps():
        for step in steps:
            step(sched)

    x = torch.randn(2, requires_grad=True)
    backward_op(run_steps)(x).sum().backward()


def _defer(name, carry=0, fn=None):
    return lambda s: s.defer(fn or (lambda: None), name, carry=carry)


def _window(comm=None, nbytes=1 << 20):
    return lambda s: s.run_while(_Handle(nbytes), comm or PolicyComm())


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "after_wait"])
def test_carried_task_runs_in_the_window_after_next(overlap):
    sched = BackwardScheduler()
    sched.trace = []
    comm = PolicyComm(overlap)
    kind = "overlapped" if overlap else "after_wait"
    _backward_running(
        sched,
        [
            _defer("experts.fc2"),
            _defer("shared.fc2", carry=1),
            _defer("experts.fc1"),
            _window(comm, nbytes=16),  # below min_window_bytes: does not count
            _window(comm),  # dispatch backward: the routed experts' dW
            _defer("attn.proj"),
            _window(comm),  # the next layer's combine backward: shared + attention
            _defer("late", carry=2),
            _window(comm),
        ],
    )
    assert sched.trace == [
        ("experts.fc2", kind),
        ("experts.fc1", kind),
        ("shared.fc2", kind),
        ("attn.proj", kind),
        ("late", "flushed"),  # the flush at the end of backward runs it regardless
    ], sched.trace
    s = sched.get_stats()
    assert s["completed_dw_tasks"] == s["total_dw_tasks"] == 5 and s["pending_dw_tasks"] == 0
    assert s["skipped_windows"] == 1


def test_a_window_with_only_carried_tasks_runs_nothing_and_counts():
    sched = BackwardScheduler()
    sched.trace = []
    seen = []

    def window_then_record(s):
        s.run_while(_Handle(), PolicyComm())
        seen.append(list(sched.trace))

    _backward_running(sched, [_defer("carried", carry=1), window_then_record, window_then_record])
    assert seen == [[], [("carried", "overlapped")]]
    assert sched.get_stats()["overlapped_windows"] == 1  # the first window had nothing due


def test_discard_after_a_failure_counts_the_carried_tasks():
    sched = BackwardScheduler()

    def boom():
        raise RuntimeError("boom in dW")

    with pytest.raises(RuntimeError, match="boom in dW"):
        _backward_running(
            sched, [_defer("carried", carry=1), _defer("bad", fn=boom), _defer("c"), _window()]
        )
    s = sched.get_stats()
    assert (s["failed_dw_tasks"], s["discarded_dw_tasks"], s["pending_dw_tasks"]) == (1, 2, 0)
    assert s["total_dw_tasks"] == 3
