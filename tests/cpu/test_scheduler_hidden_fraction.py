"""Tier: cpu. The scheduler's per-window overlap measure (`exposed_a2a_ms`, `hidden_fraction`) and
its sum over several schedulers in the training log (`log_hook.combined_stats`).

The measure must stay within its bound: at most 1, 0 when no window was filled, below 0 when the
compute stream waited longer than the all-to-alls took. CUDA events are replaced by stubs whose
`elapsed_time` returns the difference of two fixed timestamps (ms), so the arithmetic is exact.
"""

import pytest
import torch

from fluid.megatron.log_hook import combined_stats
from fluid.schedule.scheduler import BackwardScheduler, _Window


class _Ev:
    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):
        return other.t - self.t


def _stats(windows, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    s = BackwardScheduler(enabled=True, timing=True)

    def ev(t):
        return None if t is None else _Ev(t)

    for a0, a1, d0, d1, end in windows:
        s._windows.append(_Window(_Ev(a0), _Ev(a1), ev(d0), ev(d1), ev(end)))
    return s.get_stats()


def test_fully_hidden_window_is_one(monkeypatch):
    # a2a 0..2 ms; dW 0..3 ms beside it; the wait after the dW ends at once: nothing exposed.
    st = _stats([(0.0, 2.0, 0.0, 3.0, 3.0)], monkeypatch)
    assert st["exposed_a2a_ms"] == pytest.approx(0.0)
    assert st["hidden_fraction"] == pytest.approx(1.0)


def test_partly_hidden_and_unfilled_windows(monkeypatch):
    # window 1: a2a 2 ms, dW 0..1.5 then waited 0.5 ms -> 0.5 exposed; window 2: a2a 1 ms, unfilled.
    st = _stats([(0.0, 2.0, 0.0, 1.5, 2.0), (10.0, 11.0, None, None, None)], monkeypatch)
    assert st["a2a_ms"] == pytest.approx(3.0)
    assert st["exposed_a2a_ms"] == pytest.approx(1.5)
    assert st["hidden_fraction"] == pytest.approx(0.5)


def test_nothing_filled_reads_zero_and_overlap_that_costs_reads_negative(monkeypatch):
    assert _stats([(0.0, 2.0, None, None, None)], monkeypatch)["hidden_fraction"] == pytest.approx(
        0.0
    )
    # The old (T_a2a + T_dW - T_window) / min(T_a2a, T_dW) read 1.9 here; the compute stream in
    # fact waited 3 ms after a 1 ms dW for a 2 ms all-to-all (contention): -0.5.
    st = _stats([(0.0, 2.0, 0.0, 1.0, 4.0)], monkeypatch)
    assert st["hidden_fraction"] == pytest.approx(-0.5)
    assert "overlap_efficiency" not in st


def test_combined_stats_recompute_the_fraction_from_summed_times():
    a = {"a2a_ms": 2.0, "exposed_a2a_ms": 0.0, "hidden_fraction": 1.0, "total_dw_tasks": 3}
    b = {"a2a_ms": 2.0, "exposed_a2a_ms": 2.0, "hidden_fraction": 0.0, "total_dw_tasks": 1}
    out = combined_stats([a, b])
    assert out["total_dw_tasks"] == 4 and out["a2a_ms"] == 4.0
    assert out["hidden_fraction"] == pytest.approx(0.5)  # not 1.0 + 0.0
