"""`--fluid-overlap measure`: whether to run dW beside the all-to-alls, decided by timing both.

The auto policy decides from the link alone (overlap where it is slow: P2P off or between
hosts). Measured, that is right on average and wrong at the edges: over P2P off one model ran
2-4% slower with overlap on, over NVLink a layer shape outside the recipes gained nothing from
it (docs/benchmarks/overlap.md). With `measure` the run decides for itself:

1. The first `warmup` micro-batches follow the auto policy and are not timed (allocator and
   compile warm-up: the first two iterations of the benchmark models take 3-8x a later one).
2. Then micro-batches alternate overlap on and off in ABBA order (on, off, off, on, ...; a drift
   linear in time weighs both equally), each timed from its first Fluid layer's forward to the
   end of its backward: CUDA events on the current stream (read only once they completed, never
   synchronizing) or, on CPU, the host clock. A micro-batch whose backward never ended (an
   exception) is not counted.
3. Once `samples` times of each setting are read (usually at the start of micro-batch
   warmup + 2 x samples + 1; later if the GPU is behind), overlap stays on if the median
   micro-batch with it was faster, else off. If that never happens within 8 x `samples` timed
   micro-batches, the link's policy stays (with a warning).

Each micro-batch keeps one setting from its forward to the end of its backward (a Fluid op picks
its backward at forward time: `fluid.schedule.wgrad.weights_attached`). Each rank decides from its
own times, with no collective; ranks that decide differently still run the same collectives in
the same order and compute the same gradients, only placed differently in time. Refused at build
time where micro-batches interleave (combined 1F1B, pipeline parallelism) and with the scheduler
off (fluid.megatron.validate).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

ABBA = (True, False, False, True)  # overlap on / off of trial micro-batch i: ABBA[i % 4]
MAX_TRIAL_FACTOR = 8  # give up (keep the link's policy) after this many x `samples` timed ones


class HostClock:
    """Wall-clock marks (CPU, tests)."""

    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark) -> bool:
        return True

    def ms(self, start, end) -> float:
        return 1e3 * (end - start)


class CudaClock:
    """CUDA events recorded on the current stream; a pair is read once its end completed."""

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ready(self, mark) -> bool:
        return mark.query()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end)


class OverlapTrial:
    """The measured overlap decision of one BackwardScheduler (see the module docstring).

    The scheduler calls `start_microbatch()` at the first Fluid forward of a micro-batch (outside
    backward, with grad enabled) and `end_backward()` whenever a backward pass it took part in
    ends (a nested one too: the last end before the next micro-batch starts is the outer one's),
    and asks `choice()` for the micro-batch in flight: True / False during the trial and after the
    decision, None (follow the link's policy) during warm-up and if the trial gave up.
    """

    def __init__(self, warmup: int = 16, samples: int = 4, clock=None):
        if warmup < 0 or samples < 1:
            raise ValueError(f"OverlapTrial: warmup >= 0 and samples >= 1, got {warmup}, {samples}")
        self.warmup, self.samples = warmup, samples
        self._clock = clock
        self._started = 0  # micro-batches started
        self._arm: Optional[bool] = None  # setting of the micro-batch in flight (None: the link's)
        self._open: Optional[list] = None  # [arm, start mark, last end mark or None]
        self._pending: list = []  # (arm, start, end) whose end may still be on the GPU
        self._ms: dict = {True: [], False: []}
        self.decision: Optional[bool] = None
        self._gave_up = False

    def _clk(self):
        if self._clock is None:
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            self._clock = CudaClock() if cuda else HostClock()
        return self._clock

    @property
    def measuring(self) -> bool:
        """True until the decision: the scheduler then reports micro-batch boundaries."""
        return self.decision is None and not self._gave_up

    def choice(self) -> Optional[bool]:
        return self.decision if self.decision is not None else self._arm

    def start_microbatch(self) -> None:
        if self._open is not None:
            arm, start, end = self._open
            if end is not None:  # a micro-batch with no backward (an exception) is not counted
                self._pending.append((arm, start, end))
            self._open = None
        self._read()
        if not self.measuring:
            self._arm = None
            return
        i = self._started - self.warmup
        self._started += 1
        if i >= MAX_TRIAL_FACTOR * self.samples:  # times never became readable: keep the link's
            self._gave_up = True
            self._arm = None
            log.warning(
                "FluidMoE --fluid-overlap measure: no decision after %d timed micro-batches "
                "(%d with overlap, %d without read); following the link's policy (auto)",
                i,
                len(self._ms[True]),
                len(self._ms[False]),
            )
        elif i >= 0:  # ABBA until both sides have `samples` times (a dropped one is redone)
            self._arm = ABBA[i % 4]
            self._open = [self._arm, self._clk().mark(), None]
        else:  # warm-up
            self._arm = None

    def end_backward(self) -> None:
        if self._open is not None:
            self._open[2] = self._clk().mark()

    def _read(self) -> None:
        clk, left = self._clock, []
        for arm, start, end in self._pending:
            if clk.ready(end):
                self._ms[arm].append(clk.ms(start, end))
            else:
                left.append((arm, start, end))
        self._pending = left
        if self.decision is None and all(len(v) >= self.samples for v in self._ms.values()):
            on, off = statistics.median(self._ms[True]), statistics.median(self._ms[False])
            self.decision = on < off
            log.info(
                "FluidMoE --fluid-overlap measure: micro-batch median %.2f ms with overlap, %.2f "
                "without: overlap %s",
                on,
                off,
                "on" if self.decision else "off",
            )

    def stats(self) -> dict:
        """`decision` (None while measuring) and the timed micro-batches, ms."""
        return {
            "decision": self.decision,
            "on_ms": list(self._ms[True]),
            "off_ms": list(self._ms[False]),
        }
