"""Tier: cpu. fluid.moe.handoff.Handoff, the mechanism that carries the dispatcher plan's device
tensors between stages on different CUDA streams (Megatron's combined-1F1B schedule), with the
fake streams of tests/_streams.py (vector clocks) standing in for CUDA's: the consumer stream
waits for an event recorded on the producer stream after the tensors were made, and
`record_stream(consumer)` is called on each tensor once; on the producer's own stream nothing
happens. The end-to-end check under the real schedule is tests/dist/test_combined_1f1b.py
(test_combined_1f1b_stream_order)."""

from __future__ import annotations

import types

import torch

import fluid.moe.handoff as handoff
from tests._streams import FakeEvent, FakeStream


def _fake_cuda(monkeypatch):
    """CPU tensors take Handoff's CUDA path; returns (set current stream, record_stream log)."""
    state = {"current": FakeStream(name="compute")}
    recorded = []
    monkeypatch.setattr(handoff, "_on_cuda", lambda t: t is not None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: state["current"])
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda self, s: recorded.append((self, s)), raising=False
    )

    def use(stream):
        state["current"] = stream
        return stream

    return state, use, recorded


def test_other_stream_waits_and_records(monkeypatch):
    state, use, recorded = _fake_cuda(monkeypatch)
    producer = use(FakeStream(name="comm"))
    producer.tick()
    producer.tick()  # the offsets' copy, say: producer's clock 2
    a, b = torch.arange(3), torch.arange(4)
    h = handoff.Handoff(a, None, b)
    producer.tick()  # later work on the producer is not covered
    consumer = use(FakeStream(name="compute2"))
    assert consumer.vc.get(producer, 0) == 0
    out = h.take()
    assert out[0] is a and out[1] is None and out[2] is b
    assert consumer.vc[producer] == 2, "the consumer did not wait for the producer's event"
    assert [(t is a or t is b, s) for t, s in recorded] == [(True, consumer), (True, consumer)]
    h.take()  # once per consumer stream
    assert len(recorded) == 2
    third = use(FakeStream(name="third"))
    h.take()
    assert len(recorded) == 4 and recorded[-1][1] is third


def test_same_stream_does_nothing(monkeypatch):
    state, use, recorded = _fake_cuda(monkeypatch)
    s = use(FakeStream(name="only"))
    h = handoff.Handoff(torch.arange(3))
    s.tick()
    h.take()
    assert recorded == [] and list(s.vc) == [s]


def test_cpu_tensors_hold_only():
    """On CPU (the real `_on_cuda`) no stream API is touched."""
    t = torch.arange(2)
    h = handoff.Handoff(t)
    assert h.stream is None and h.event is None and h.take()[0] is t


def test_counts_exchange_on_the_group_stream_when_staged(monkeypatch):
    """Staged (combined-1F1B), the count all-to-all of the pre-dispatch stage goes through the
    CommContext (its one stream for the group's collectives, in host order on every rank), not
    ProcessGroupNCCL on the current stream beside the other micro-batch's all-to-alls; unstaged
    (FluidMoELayer.forward) and on gloo it stays a plain collective."""
    import fluid.moe.dispatcher as dispatcher

    calls = []

    class Handle:
        def wait(self):
            calls.append("wait")

    class Comm:
        group, is_nccl = object(), True

        def all_to_all_single(self, out, inp, out_splits, in_splits):
            calls.append(("comm", out_splits, in_splits))
            out.copy_(inp)
            return Handle()

    def plain(out, inp, group=None):
        calls.append(("dist", group))
        out.copy_(inp)

    monkeypatch.setattr(dispatcher.dist, "all_to_all_single", plain)
    disp = types.SimpleNamespace(comm=Comm())
    send = torch.arange(4)
    f = dispatcher.FluidTokenDispatcher._counts_all_to_all
    assert torch.equal(f(disp, send, True), send)
    assert calls == [("comm", None, None), "wait"]
    calls.clear()
    f(disp, send, False)
    assert calls == [("dist", disp.comm.group)]
    calls.clear()
    disp.comm.is_nccl = False
    f(disp, send, True)
    assert calls == [("dist", disp.comm.group)]
