"""Tier: cpu. Every dW task handed to a BackwardScheduler is accounted for in its stats.

total_dw_tasks = completed + failed + discarded + dropped_stale + pending, also when a dW closure
raises: the raising task counts as failed, the tasks still queued behind it as discarded (they
used to vanish: total 4, completed 2, pending 0, dropped 0), and the loss is logged. Tasks dropped
by `clear()` count as discarded, leftovers a forward finds as dropped_stale.
"""

import logging

import pytest
import torch

from fluid.schedule.scheduler import BackwardScheduler
from fluid.testing.autograd import backward_op


def _balance(s):
    return (
        s["completed_dw_tasks"]
        + s["failed_dw_tasks"]
        + s["discarded_dw_tasks"]
        + s["dropped_stale_tasks"]
        + s["pending_dw_tasks"]
    )


def _op(sched, tasks):
    """x -> x, whose backward hands `tasks` (name, fn) to the scheduler."""

    def defer_all():
        for name, fn in tasks:
            sched.defer(fn, name)

    return backward_op(defer_all)


def test_a_raising_dw_task_is_counted_with_the_ones_it_discards(caplog):
    sched = BackwardScheduler()  # no CommContext: tasks queue and flush at the end of backward
    ran = []

    def boom():
        raise RuntimeError("boom in dW")

    tasks = [
        ("a", lambda: ran.append("a")),
        ("b", lambda: ran.append("b")),
        ("bad", boom),
        ("d", lambda: ran.append("d")),
    ]
    x = torch.randn(3, requires_grad=True)
    with caplog.at_level(logging.ERROR, logger="fluid.schedule.scheduler"):
        with pytest.raises(RuntimeError, match="boom in dW"):
            _op(sched, tasks)(x).sum().backward()
    s = sched.get_stats()
    assert ran == ["a", "b"]
    assert (
        s["total_dw_tasks"],
        s["completed_dw_tasks"],
        s["failed_dw_tasks"],
        s["discarded_dw_tasks"],
        s["pending_dw_tasks"],
    ) == (4, 2, 1, 1, 0), s
    assert _balance(s) == s["total_dw_tasks"]
    assert "'bad' raised RuntimeError: boom in dW; 1 queued dW task(s) discarded" in caplog.text


def test_a_raising_inline_task_counts_as_failed():
    sched = BackwardScheduler(enabled=False)

    def boom():
        raise ValueError("inline boom")

    with pytest.raises(ValueError):
        sched.defer(boom, "inline")
    s = sched.get_stats()
    assert (s["total_dw_tasks"], s["failed_dw_tasks"]) == (1, 1) and _balance(s) == 1


def test_clear_and_stale_tasks_are_counted():
    sched = BackwardScheduler()
    sched._queue.extend([object(), object()])  # as `defer` leaves them inside a backward
    sched._stats["total_dw_tasks"] += 2
    sched.clear()
    sched._queue.append(object())
    sched._stats["total_dw_tasks"] += 1
    sched.on_forward()  # outside backward: the leftover is stale
    s = sched.get_stats()
    assert (s["discarded_dw_tasks"], s["dropped_stale_tasks"], s["pending_dw_tasks"]) == (2, 1, 0)
    assert _balance(s) == s["total_dw_tasks"] == 3
