"""Tier: cpu. The benchmark's host-side tools: timeline_summary's busy/idle arithmetic on a
hand-made timeline, and bench_moe.stage_hooks wrapping a FluidMoELayer's stages and restoring
them (a GPU run that reports wrong numbers or leaves wrappers behind would cost device time)."""

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_moe import FLUID_STAGES, stage_hooks  # noqa: E402
from benchmarks.timeline_summary import summarize  # noqa: E402


def test_summarize_busy_idle_and_gaps():
    rows = [
        ["cpu", 0.0, 5.0, "fwd"],
        ["cpu", 0.5, 1.0, "stage:route"],
        ["cpu", 2.0, 0.5, "stage:route"],  # two calls: summed
        [7, 0.0, 5.0, "fwd"],  # the annotation's GPU row: not a kernel
        [7, 1.0, 1.0, "gemm_a"],
        [7, 1.5, 1.0, "gemm_b"],  # overlaps gemm_a: busy 1.0-2.5
        [7, 4.0, 0.5, "gemm_c"],  # gap 1.5 ms before it
        [7, 3.0, 0.2, "ncclDevKernel_SendRecv"],  # NCCL on the compute stream: not compute
        [30, 2.0, 3.0, "ncclDevKernel_SendRecv"],
    ]
    s = summarize(rows)
    assert s["compute_stream"] == 7
    assert abs(s["span_ms"] - 4.0) < 1e-9  # first GPU start 1.0 (kernels), last end 5.0 (nccl)
    assert abs(s["compute_busy_ms"] - 2.0) < 1e-9
    assert abs(s["compute_idle_ms"] - 2.0) < 1e-9
    assert abs(s["nccl_ms"] - 3.2) < 1e-9
    assert s["largest_gaps"][0][:2] == (1.5, 2.5)
    assert s["host_fwd_ms"] == 5.0 and s["host_stages_ms"] == {"route": 1.5}


class _Obj:
    def __init__(self, *names):
        for n in names:
            setattr(self, n, lambda *a, _n=n: (_n, a))


def test_stage_hooks_wrap_and_restore():
    layer = _Obj("route")
    layer.token_dispatcher = _Obj(*[m for p, m in FLUID_STAGES if p == "token_dispatcher"])
    layer.experts = _Obj("forward")
    seen = []

    @contextlib.contextmanager
    def record(name):
        seen.append(name)
        yield

    with stage_hooks(layer, record):
        assert layer.route(1) == ("route", (1,))
        layer.token_dispatcher.dispatch_chunks()
        layer.experts.forward()
    assert seen == ["stage:route", "stage:token_dispatcher.dispatch_chunks", "stage:experts.forward"]
    layer.route(2)  # the wrappers are gone, the original attributes back
    layer.token_dispatcher.dispatch_chunks()
    assert len(seen) == 3 and layer.route(3) == ("route", (3,))


def test_stage_hooks_leave_a_stock_layer_alone():
    layer = _Obj("route")
    layer.token_dispatcher = _Obj("token_dispatch")  # no dispatch_chunks: stock's dispatcher
    with stage_hooks(layer, lambda name: contextlib.nullcontext()):
        assert "route" in vars(layer)  # the instance's own attribute, not a wrapper
        assert layer.route() == ("route", ())


def test_stage_hooks_on_class_methods():
    class Dispatcher:
        def dispatch_chunks(self):
            return "chunks"

    class Layer:
        def route(self):
            return "routed"

    layer = Layer()
    layer.token_dispatcher = Dispatcher()
    layer.experts = _Obj("forward")
    for _, m in FLUID_STAGES:  # the rest of the stages, as instance attributes
        obj = layer.token_dispatcher
        if m not in ("route", "forward", "dispatch_chunks"):
            setattr(obj, m, lambda: None)
    seen = []
    with stage_hooks(layer, lambda name: contextlib.nullcontext(seen.append(name))):
        assert layer.route() == "routed" and layer.token_dispatcher.dispatch_chunks() == "chunks"
    assert seen == ["stage:route", "stage:token_dispatcher.dispatch_chunks"]
    assert "route" not in vars(layer) and "dispatch_chunks" not in vars(layer.token_dispatcher)
