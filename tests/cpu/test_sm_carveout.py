"""Tier: cpu. SM carve-out for GEMMs issued beside an in-flight all-to-all.

What must hold (see `fluid.comm.context.CommContext.beside_comm`):
  - `sm_carveout(n)` sets PyTorch's GEMM carve-out inside and restores the previous value on exit,
    also when the body raises and when nested;
  - the BackwardScheduler runs the dW it drains *beside* an all-to-all inside the group's
    `beside_comm()`, and dW it runs inline or after the wait outside it;
  - a gloo group (CPU) or a carve-out of 0 never touches the setting; "auto" (the default)
    carves out AUTO_SM_CARVEOUT SMs only where the link is slow.
The setting is host state read at each GEMM launch, so reading it from inside a dW closure shows
what that closure's GEMMs would be launched with. Whether the carve-out pays is a GPU benchmark
(`benchmarks/probes/contention.py`).
"""

import contextlib

import pytest
import torch

from fluid.comm.context import CommContext, CommHandle, sm_carveout
from fluid.schedule.scheduler import BackwardScheduler, _Task

get = torch._C._get_sm_carveout_experimental


@pytest.fixture(autouse=True)
def _restore():
    before = get()
    yield
    torch._C._set_sm_carveout_experimental(before)


def test_sets_and_restores_also_nested_and_on_error():
    torch._C._set_sm_carveout_experimental(None)
    with sm_carveout(16):
        assert get() == 16
        with sm_carveout(8):
            assert get() == 8
        assert get() == 16
    assert get() is None
    with pytest.raises(RuntimeError):
        with sm_carveout(24):
            raise RuntimeError("boom")
    assert get() is None


class _StubComm:
    """What run_while reads of a CommContext, with the real `beside_comm` logic."""

    def __init__(self, carveout, nccl=True, overlap=True, slow_link=True):
        self.sm_carveout, self.is_nccl, self._overlap = carveout, nccl, overlap
        self._slow_link, self.group = slow_link, None
        self.min_window_bytes = 0

    def should_overlap(self):
        return self._overlap

    beside_comm = CommContext.beside_comm
    resolved_sm_carveout = CommContext.resolved_sm_carveout
    slow_link = CommContext.slow_link


def _run_window(comm):
    sched = BackwardScheduler(enabled=True, timing=False)
    seen = []
    sched._queue.append(_Task(lambda: seen.append(get()), "dw", 0))
    sched.run_while(CommHandle(nbytes=1 << 30, waited=True), comm)
    assert sched.num_pending == 0
    return seen


def test_scheduler_drains_beside_the_all_to_all_with_the_carveout():
    torch._C._set_sm_carveout_experimental(None)
    assert _run_window(_StubComm(20)) == [20]
    assert get() is None  # restored after the window


def test_auto_carveout_only_over_a_slow_link():
    from fluid.comm.context import AUTO_SM_CARVEOUT

    torch._C._set_sm_carveout_experimental(None)
    assert AUTO_SM_CARVEOUT > 0
    assert _run_window(_StubComm("auto")) == [AUTO_SM_CARVEOUT]
    assert _run_window(_StubComm("auto", slow_link=False)) == [None]


@pytest.mark.parametrize(
    "comm",
    [
        _StubComm(20, overlap=False),
        _StubComm(0),
        _StubComm(20, nccl=False),
        _StubComm("auto", nccl=False),
    ],
    ids=["dw_after_the_wait", "carveout_0", "gloo", "gloo_auto"],
)
def test_no_carveout_where_nothing_runs_beside_nccl(comm):
    torch._C._set_sm_carveout_experimental(None)
    assert _run_window(comm) == [None]


def test_inline_dw_runs_without_carveout():
    torch._C._set_sm_carveout_experimental(None)
    sched = BackwardScheduler(enabled=False, timing=False)
    seen = []
    with contextlib.nullcontext():
        sched.defer(lambda: seen.append(get()), "dw")
    assert seen == [None]
