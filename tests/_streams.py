"""CPU stand-in for CUDA streams that checks stream ordering (`StreamOrderChecker`).

On CPU every op runs at once, so a missing stream wait or `record_stream` changes no number; this
checker makes it visible. Streams and events become fakes with vector clocks: every op ticks the
clock of the current (fake) stream, `Event.record` snapshots the stream's clock vector,
`wait_event` / `Event.wait` / `wait_stream` merge it into the waiting stream's. A
TorchDispatchMode sees every op and, per tensor storage, remembers the stream that allocated it,
the last write (stream, tick) and the last use per stream. Two rules, those of PyTorch's CUDA
caching allocator:
  - read: an op on stream C reading a storage last written on stream P at tick p needs
    C's clock of P >= p (C waited for an event recorded on P after the write);
  - free: when the storage dies, every other stream U that used it (last at tick u) must be
    covered: `record_stream(U)` was called on it, or the allocating stream A has waited for U
    (A's clock of U >= u). Otherwise A could hand the block to new work while U still reads it.
Only storages allocated by code under a `fluid/` or `tests/` directory are checked (Megatron's
own node inputs and outputs follow its schedule's protocol, not Fluid's).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ids = itertools.count()


class FakeStream:
    """A CUDA stream stand-in with a vector clock (`vc`: stream -> tick)."""

    def __init__(self, *args, name=None, **kwargs):
        self.name = name or f"stream{next(_ids)}"
        self.vc = {self: 0}
        self.device_index = None

    def __repr__(self):
        return self.name

    def tick(self) -> int:
        self.vc[self] += 1
        return self.vc[self]

    def merge(self, vc):
        for s, t in (vc or {}).items():
            if t > self.vc.get(s, 0):
                self.vc[s] = t

    def wait_event(self, event):
        self.merge(event.vc)

    def wait_stream(self, other):
        self.merge(other.vc)

    def record_event(self, event=None):
        event = event or FakeEvent()
        event.record(self)
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    @staticmethod
    def priority_range():
        return (0, -1)


class FakeEvent:
    def __init__(self, *args, **kwargs):
        self.vc = None

    def record(self, stream=None):
        stream = stream or _STATE.current
        self.vc = dict(stream.vc)

    def wait(self, stream=None):
        (stream or _STATE.current).merge(self.vc)

    def synchronize(self):
        pass

    def query(self):
        return True


class _State:
    current: FakeStream = None


_STATE = _State()


class _Info:
    __slots__ = ("alloc", "writer", "uses", "recorded", "where", "op")

    def __init__(self, alloc, where, op):
        self.alloc, self.where, self.op = alloc, where, op
        self.writer = (alloc, 0)
        self.uses: dict = {}
        self.recorded: set = set()


def _caller() -> str:
    """`file:line` of the innermost frame outside torch (and this file)."""
    f = sys._getframe(2)
    here = os.path.abspath(__file__)
    while f is not None:
        fn = f.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in fn and os.path.abspath(fn) != here:
            return f"{fn}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _checked(where: str) -> bool:
    return f"{os.sep}fluid{os.sep}" in where or f"{os.sep}tests{os.sep}" in where


class StreamOrderChecker(TorchDispatchMode):
    """Tracks every op under fake streams; `violations` lists broken rules (see module doc)."""

    def __init__(self):
        super().__init__()
        self.infos: dict[int, _Info] = {}
        self.violations: list[str] = []
        self.default = FakeStream(name="default")
        _STATE.current = self.default

    def _info(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return None
        st = t.untyped_storage()
        return self.infos.get(id(st))

    def _track(self, t, stream, tick, op):
        st = t.untyped_storage()
        key = id(st)
        info = self.infos.get(key)
        if info is None:
            where = _caller()
            info = _Info(stream, where, op)
            self.infos[key] = info
            weakref.finalize(st, self._freed, key).atexit = False
        info.writer = (stream, tick)
        info.uses[stream] = tick

    def _freed(self, key):
        info = self.infos.pop(key, None)
        if info is None or not _checked(info.where):
            return
        a = info.alloc
        for u, tick in info.uses.items():
            if u is a or u in info.recorded or a.vc.get(u, 0) >= tick:
                continue
            self.violations.append(
                f"freed while in use: storage from {info.op} at {info.where}, allocated on {a}, "
                f"used on {u} at tick {tick}; {a} has seen {u} up to {a.vc.get(u, 0)}, no "
                f"record_stream({u})"
            )

    def record_stream(self, t, stream):
        info = self._info(t)
        if info is not None:
            info.recorded.add(stream)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = _STATE.current
        tick = s.tick()
        ins, _ = tree_flatten((args, kwargs))
        for t in ins:
            info = self._info(t)
            if info is None:
                continue
            w, wt = info.writer
            if w is not s and s.vc.get(w, 0) < wt and _checked(info.where):
                self.violations.append(
                    f"read before written: {func} on {s} reads storage from {info.op} at "
                    f"{info.where}, written on {w} at tick {wt}; {s} has seen {w} up to "
                    f"{s.vc.get(w, 0)}"
                )
            info.uses[s] = tick
        out = func(*args, **kwargs)
        outs, _ = tree_flatten(out)
        for t in outs:
            if (
                isinstance(t, torch.Tensor)
                and t.device.type == "cpu"
                and t.untyped_storage().nbytes()
            ):
                self._track(t, s, tick, str(func))
        return out


@contextlib.contextmanager
def _set_current(stream):
    prev = _STATE.current
    if stream is not None:
        _STATE.current = stream
    try:
        yield
    finally:
        _STATE.current = prev


def install_fake_streams(checker: StreamOrderChecker) -> None:
    """Route this (CPU-only) process's torch.cuda stream/event calls to the fakes."""
    torch.cuda.Event = FakeEvent
    torch.cuda.Stream = FakeStream
    torch.cuda.stream = _set_current
    torch.cuda.current_stream = lambda *a, **k: _STATE.current
    torch.cuda.set_stream = lambda s: setattr(_STATE, "current", s)
    torch.Tensor.record_stream = lambda self, stream: checker.record_stream(self, stream)


def cpu_schedules_torch():
    """`forward_backward_no_pipelining` allocates its token counter with device="cuda"."""
    import megatron.core.pipeline_parallel.schedules as schedules

    real_torch = torch

    class _SchedulesTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real_torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return real_torch.zeros(*args, **kwargs)

    schedules.torch = _SchedulesTorch("torch")
