"""BackwardScheduler: weight gradients (dW) deferred into the windows of backward all-to-alls.

In backward, a Fluid layer computes dX at once (the next op needs it) and hands its dW to the
scheduler as a closure (`defer`). When a Fluid all-to-all's backward has launched its
communication, it calls `run_while(handle, comm)`: the queued dW closures run on the compute stream
while the all-to-all is in flight, then the compute stream waits for it. Per layer that turns
T_dX + T_dW + T_a2a into T_dX + max(T_dW, T_a2a).

Protocol (one backward pass, i.e. one `torch.autograd.backward` call):
  1. A Fluid op's backward calls `defer(fn)`. Outside a backward, with the scheduler disabled, or
     when no all-to-all of this scheduler's model can take dW beside it (every CommContext of its
     runtime says no: the auto policy over NVLink, see CommContext.should_overlap), `fn` runs
     inline,
     exactly where stock Megatron computes dW: deferring it would only hold its activations
     longer. Otherwise it is queued and, once per backward pass, an end-of-backward callback is
     armed on the autograd engine.
  2. A Fluid all-to-all's backward launches its collective and calls `run_while`. A tiny
     all-to-all (below CommContext.min_window_bytes) leaves the queue for the next one. Otherwise,
     if the link is slow enough for overlap to pay (CommContext.should_overlap) every due task
     runs before the wait; otherwise after it. A task is due unless it was deferred with
     `carry=n` and fewer than n windows have passed since: the shared experts' dW (FluidMoELayer)
     is queued just before its layer's dispatch-backward window, which the routed experts' dW
     already fills, and carried to the next window, the combine backward of the layer below,
     which otherwise gets only that layer's attention dW. Everything else drains at the first
     window, so a closure (which holds activations) lives no longer than one layer, a carried
     one one layer more (its inputs and output gradient: for the 64-expert benchmark model's
     shared expert, 4096 tokens x (2048 + 5632 + 2816 + 2048) bf16 values, 103 MB).
  3. When the engine finishes the backward pass, the armed callback flushes whatever is left
     (e.g. the first layer's QKV dW, which has no all-to-all after it).

No dW is lost or late: each closure ends in `accumulate_weight_grad`, which hands the gradient to
autograd for that parameter, so `param.grad` accumulation, Megatron DDP's per-parameter hook
(`main_grad.add_`, and with `overlap_grad_reduce` the bucket's grad-ready count) fire when the dW
exists, never before. Buckets cannot reduce early, `finalize_model_grads` and the optimizer run
after the backward call returned (after step 3), and the next micro-batch starts from a flushed
queue.

Every task is accounted for: total_dw_tasks = completed + failed + discarded + dropped_stale +
pending (`get_stats()`).

Failure: a closure that raises clears the queue before the exception propagates; it counts as
failed, the queued tasks as discarded, and both are logged. If another op raises, the engine
never reaches step 3; the stale closures are dropped (with a warning) the next time a Fluid layer
runs forward, so no activation is held past the next step and the next step's gradients are not
polluted.

Reentrant checkpointing: a recomputed layer's backward is a nested graph task; its tasks join the
same queue, and the callback armed for the nested task flushes the queue when the nested backward
ends (correct, with less overlap than without recomputation).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fluid.schedule.overlap_trial import OverlapTrial

log = logging.getLogger(__name__)


def _graph_task_id() -> int:
    """Id of the autograd graph task running on this thread; -1 outside backward."""
    return torch._C._current_graph_task_id()


@dataclass
class _Task:
    fn: Callable[[], None]
    name: str
    graph_task: int
    carry: int = 0  # windows this task lets pass before it is due (`defer`)


def exposed_a2a_ms(a2a: float, overlapped_a2a: float, window: float, dw_in_window: float) -> float:
    """All-to-all time the compute stream waited for (ms): in filled windows the wait after the
    dW (`window - dw_in_window`), in unfilled ones the whole all-to-all (`a2a - overlapped_a2a`).
    At most `a2a` when overlap costs nothing, so 1 - exposed / a2a is at most 1."""
    return (window - dw_in_window) + (a2a - overlapped_a2a)


@dataclass
class _Window:
    """CUDA events of one all-to-all window (timing mode only)."""

    a2a_start: Optional[torch.cuda.Event]
    a2a_end: torch.cuda.Event
    dw_start: Optional[torch.cuda.Event]  # the three dW marks are set together (filled window)
    dw_end: Optional[torch.cuda.Event]
    end: Optional[torch.cuda.Event]


class BackwardScheduler:
    """One per model (fluid.runtime.FluidRuntime; `get_backward_scheduler()` for the latest).

    Args:
        enabled: defer dW into all-to-all windows (`--fluid-scheduler`, default on). Disabled,
            every dW runs inline in its op's backward, giving bit-identical gradients.
        timing: record CUDA events per window (`--fluid-scheduler-timing`, default off; reading
            them in `get_stats()` synchronizes the device).
    """

    def __init__(self, enabled: bool = True, timing: bool = False):
        self.enabled = bool(enabled)
        self.timing = bool(timing)
        self._queue: deque[_Task] = deque()
        self._armed_for: Optional[int] = None
        self.trace: Optional[list] = None  # set to a list to record (task name, kind) in run order
        self._comms: "weakref.WeakSet" = weakref.WeakSet()  # live CommContexts (register_comm)
        # --fluid-overlap measure: the measured decision (made by register_comm for a context
        # that asks for it) and whether a micro-batch is in flight (forward seen, backward not
        # ended)
        self.trial: Optional[OverlapTrial] = None
        self._microbatch_open = False
        self.reset_stats()

    # -- switches ---------------------------------------------------------------------------
    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Run every dW inline from now on (pending tasks, if any, are flushed first)."""
        self.flush()
        self.enabled = False

    def set_timing(self, on: bool) -> None:
        self.timing = on

    @property
    def num_pending(self) -> int:
        return len(self._queue)

    def register_comm(self, comm) -> None:
        """Called by every CommContext whose windows this scheduler fills: their policies decide
        whether deferring can pay at all. A context with `overlap="measure"` gives this
        scheduler its OverlapTrial (one per scheduler: every context of a model shares it)."""
        self._comms.add(comm)
        if getattr(comm, "overlap", None) == "measure" and self.trial is None:
            self.trial = OverlapTrial()

    @property
    def num_comms(self) -> int:
        """Live CommContexts registered so far."""
        return len(self._comms)

    def overlap_possible(self, comm=None) -> bool:
        """Whether a queued dW can run beside an all-to-all: of `comm` when given (the group
        whose window will take it), else of any CommContext registered here (this model's).
        False then means a queued dW would only run after some wait, later than inline and
        holding memory longer. True with no CommContext at all (deferred linears tested alone)."""
        if comm is not None:
            return comm.should_overlap()
        comms = list(self._comms)
        return not comms or any(c.should_overlap() for c in comms)

    def defers_dw(self, comm=None) -> bool:
        """Whether a dW handed to `defer` inside a backward would be queued (not run inline);
        `comm` as in `overlap_possible`.

        Layers ask this at forward time to pick a backward that needs no deferral when none will
        happen (FluidGroupedMLP's per-expert path, fluid.moe.expert_loop)."""
        return self.enabled and self.overlap_possible(comm)

    # -- producer side ----------------------------------------------------------------------
    def defer(self, fn: Callable[[], None], name: str = "", carry: int = 0) -> None:
        """Queue a dW closure (or run it inline; see the module docstring, step 1). `carry`:
        windows to let pass before the task is due (step 2); the end-of-backward flush runs it
        regardless."""
        gid = _graph_task_id()
        if gid == -1 or not self.defers_dw():
            self.run_inline(fn, name)
            return
        self._arm_backward_end(gid)
        self._stats["total_dw_tasks"] += 1
        # A different graph task is not a sign of staleness: reentrant activation checkpointing
        # (Megatron's --recompute-granularity full, torch.utils.checkpoint(use_reentrant=True))
        # runs each recomputed layer's backward as a nested graph task while the outer one's
        # tasks are still queued. Stale tasks are detected at the next forward (on_forward).
        self._queue.append(_Task(fn, name, gid, int(carry)))

    def _arm_backward_end(self, gid: int) -> None:
        """Have the engine call `_on_backward_end` when graph task `gid` ends (once per task)."""
        if gid != -1 and self._armed_for != gid:
            self._armed_for = gid
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _measuring(self) -> bool:
        return self.trial is not None and self.trial.measuring

    def run_inline(self, fn: Callable[[], None], name: str = "") -> None:
        """Run a dW closure now, counted as an inline task: `defer` when it does not queue, and
        Fluid ops whose weights are autograd inputs (fluid.schedule.wgrad.weights_attached)."""
        self._stats["total_dw_tasks"] += 1
        gid = _graph_task_id()
        if self._measuring():  # the trial needs every backward's end, deferring or not
            self._arm_backward_end(gid)
        self._run(_Task(fn, name, gid), kind="inline")

    def on_forward(self) -> None:
        """Called by Fluid layers at forward: tasks still queued outside backward are stale.
        The first call of a training micro-batch (outside backward, grad enabled) starts it for
        the OverlapTrial while that measures."""
        outside = _graph_task_id() == -1
        if self._queue and outside:
            self._drop_stale("backward did not finish (an exception?)")
        trial = self.trial
        if outside and trial is not None and trial.measuring and not self._microbatch_open:
            if torch.is_grad_enabled():
                self._microbatch_open = True
                trial.start_microbatch()

    # -- consumer side ----------------------------------------------------------------------
    def run_while(self, handle, comm) -> None:
        """Fill the window of an in-flight all-to-all with queued dW, then wait for it."""
        self._stats["a2a_calls"] += 1
        if self._measuring():
            self._arm_backward_end(_graph_task_id())
        # Too small to be worth filling: the queue waits for the next, larger window.
        skip = bool(self._queue) and handle.nbytes < comm.min_window_bytes
        self._stats["skipped_windows"] += skip
        due = any(t.carry == 0 for t in self._queue)  # only carried tasks: they wait, see below
        overlap = due and not skip and self.enabled and comm.should_overlap()
        cuda = handle.done is not None
        dw_start = dw_end = end = None
        if overlap:
            self._stats["overlapped_windows"] += 1
            if self.timing:
                dw_start = self._mark(cuda)
            try:
                with comm.beside_comm():
                    self._drain_due(kind="overlapped")
            except BaseException:
                handle.wait()  # never leave a collective in flight behind an exception
                raise
            if self.timing:
                dw_end = self._mark(cuda)
            handle.wait()
            if self.timing:
                end = self._mark(cuda)
        else:
            handle.wait()
            if not skip:  # runs the due tasks (none if all are carried) and counts the window
                self._drain_due(kind="after_wait")
        if not self.timing:
            return
        if cuda:  # every window counts towards a2a_ms; overlapped ones also carry dW marks
            self._windows.append(_Window(handle.start_event, handle.done, dw_start, dw_end, end))
        elif overlap:  # CPU: wall-clock; the a2a alone is not observable when dW runs beside it
            assert dw_start is not None and dw_end is not None and end is not None
            self._cpu_times["dw"] += dw_end - dw_start
            self._cpu_times["window"] += end - dw_start

    def flush(self) -> None:
        """Run every pending dW now (end of backward, or before reading gradients by hand)."""
        if self._queue:
            self._drain(kind="flushed")

    def clear(self) -> None:
        """Drop pending tasks without running them (their gradients are lost; counted in
        `discarded_dw_tasks`)."""
        self._discard("discarded_dw_tasks")

    # -- internals --------------------------------------------------------------------------
    def _on_backward_end(self) -> None:
        self._armed_for = None
        self.flush()
        if self.trial is not None:
            self.trial.end_backward()
            self._microbatch_open = False

    def _drop_stale(self, why: str) -> None:
        log.warning("FluidMoE: dropping %d stale dW task(s): %s", len(self._queue), why)
        self._discard("dropped_stale_tasks")

    def _discard(self, counter: str) -> None:
        """Empty the queue, counting the tasks in `counter`."""
        self._stats[counter] += len(self._queue)
        self._queue.clear()
        self._armed_for = None

    def _drain(self, kind: str) -> None:
        while self._queue:
            self._run(self._queue.popleft(), kind)

    def _drain_due(self, kind: str) -> None:
        """Run the due tasks in queue order; the carried ones stay queued, in order, one window
        closer to due. They stay in the deque throughout, so a failing task's discard counts
        them (module docstring, "Failure")."""
        for _ in range(len(self._queue)):
            task = self._queue.popleft()
            if task.carry:
                task.carry -= 1
                self._queue.append(task)
            else:
                self._run(task, kind)

    def _run(self, task: _Task, kind: str) -> None:
        try:
            task.fn()
        except BaseException as exc:
            # The failed task and every task still queued are lost: count and log them, so the
            # stats still add up (module docstring, "Failure").
            self._stats["failed_dw_tasks"] += 1
            log.error(
                "FluidMoE: dW task %r raised %s: %s; %d queued dW task(s) discarded, their "
                "weight gradients are lost",
                task.name,
                type(exc).__name__,
                exc,
                len(self._queue),
            )
            self._discard("discarded_dw_tasks")
            raise
        self._stats["completed_dw_tasks"] += 1
        self._stats[f"{kind}_dw_tasks"] += 1
        if self.trace is not None:
            self.trace.append((task.name, kind))

    @staticmethod
    def _mark(cuda: bool):
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    # -- stats ------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = {
            k: 0
            for k in (
                "total_dw_tasks",
                "completed_dw_tasks",
                "overlapped_dw_tasks",
                "after_wait_dw_tasks",
                "inline_dw_tasks",
                "flushed_dw_tasks",
                "failed_dw_tasks",
                "discarded_dw_tasks",
                "dropped_stale_tasks",
                "a2a_calls",
                "overlapped_windows",
                "skipped_windows",
            )
        }
        self._windows: list[_Window] = []
        self._cpu_times = {"dw": 0.0, "window": 0.0}

    def get_stats(self) -> dict:
        """Counters since `reset_stats()`, plus timings when timing is on.

        Keys: enabled, timing, pending_dw_tasks, total_dw_tasks, completed_dw_tasks,
        overlapped_dw_tasks (ran while an all-to-all was in flight), after_wait_dw_tasks (ran
        right after a short all-to-all, see CommContext.should_overlap), inline_dw_tasks
        (scheduler off, outside backward, or no CommContext overlaps: `overlap_possible`),
        flushed_dw_tasks (end of backward), failed_dw_tasks (closures that raised),
        discarded_dw_tasks (queued tasks dropped unrun: after a failure, or by `clear()`),
        dropped_stale_tasks (queued tasks a forward found left over), a2a_calls, overlapped_windows, skipped_windows (all-to-alls below
        CommContext.min_window_bytes, left for a larger window). With timing on (CUDA): a2a_ms (sum of
        all backward all-to-alls, comm-stream events), overlapped_a2a_ms, dw_in_window_ms,
        window_ms (launch of the dW to the end of the wait, overlapped windows only),
        exposed_a2a_ms (what the compute stream waited for all-to-alls: the wait after the dW of
        a filled window, the whole all-to-all of an unfilled one) and hidden_fraction =
        1 - exposed_a2a_ms / a2a_ms: at most 1, 0 when no window was filled, below 0 when the
        compute stream waited longer than the all-to-alls took. Reading them synchronizes.
        """
        s: dict[str, Any] = dict(self._stats)
        s.update(enabled=self.enabled, timing=self.timing, pending_dw_tasks=len(self._queue))
        if self.trial is not None:
            s["overlap_trial"] = self.trial.stats()
        if not self.timing:
            return s
        if self._windows:
            torch.cuda.synchronize()
            a2a = ov_a2a = dw = win = 0.0
            for w in self._windows:
                t_a2a = w.a2a_start.elapsed_time(w.a2a_end) if w.a2a_start is not None else 0.0
                a2a += t_a2a
                if w.dw_start is not None:
                    assert w.dw_end is not None and w.end is not None
                    ov_a2a += t_a2a
                    dw += w.dw_start.elapsed_time(w.dw_end)
                    win += w.dw_start.elapsed_time(w.end)
            exposed = exposed_a2a_ms(a2a, ov_a2a, win, dw)
            s.update(
                a2a_ms=a2a,
                overlapped_a2a_ms=ov_a2a,
                dw_in_window_ms=dw,
                window_ms=win,
                exposed_a2a_ms=exposed,
                hidden_fraction=(1.0 - exposed / a2a) if a2a > 0 else None,
            )
        else:
            s.update(
                dw_in_window_ms=1e3 * self._cpu_times["dw"],
                window_ms=1e3 * self._cpu_times["window"],
            )
        return s


_DEFAULT: Optional[BackwardScheduler] = None


def default_scheduler() -> BackwardScheduler:
    """The scheduler of code that runs without a model's runtime (a CommContext or a deferred
    linear built by hand, as in tests): default settings, created on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = BackwardScheduler()
    return _DEFAULT


def get_backward_scheduler() -> BackwardScheduler:
    """The scheduler of the most recently built model that is still alive (fluid.runtime): with
    one model per process, that model's. Before any model, `default_scheduler()`."""
    from fluid.runtime import latest_runtime

    rt = latest_runtime()
    return rt.scheduler if rt is not None else default_scheduler()
