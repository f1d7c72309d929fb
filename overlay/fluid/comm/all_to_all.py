"""Autograd-aware all-to-all with uneven splits, whose backward feeds the BackwardScheduler.

Shapes: `x` is `[N, ...]` split along dim 0 into `input_splits` (one count per rank of the group,
summing to N); the output is `[sum(output_splits), ...]`. Backward is the same collective with the
splits swapped. `None` splits mean equal splits.

Forward: the collective starts on the context's communication stream; with `async_op=True` the
caller gets `(output, handle)` and waits where it wants (chunked forward pipelining), otherwise the
output is returned already waited.

Backward (the point of FluidMoE): the gradient all-to-all is launched first, then the
BackwardScheduler runs the weight-gradient tasks queued so far while it is in flight, then the
compute stream waits for it. dX of the next op depends on this result, so it stays on the critical
path; dW does not, so it fills the window. See fluid/schedule/scheduler.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fluid.comm.context import CommContext, CommHandle


def _as_list(splits) -> Optional[list[int]]:
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


def _launch(
    comm: CommContext,
    x: torch.Tensor,
    output_splits,
    input_splits,
    timing=False,
    ready=None,
    out=None,
):
    if not x.is_contiguous():
        x, ready = (
            x.contiguous(),
            None,
        )  # the copy is queued now: an earlier event would not cover it
    if output_splits is None:
        if x.shape[0] % comm.size:
            raise ValueError(
                f"equal-split all-to-all needs dim 0 ({x.shape[0]}) % {comm.size} == 0"
            )
        out_rows = x.shape[0]
    else:
        out_rows = sum(output_splits)
    if out is None:
        if ready is not None:
            # A buffer allocated now may be memory that compute queued after `ready` still uses
            # (the caching allocator reuses it in stream order): NCCL, waiting only for `ready`,
            # would write into it while that compute runs.
            raise ValueError("fluid_all_to_all: `ready` needs `out` allocated before `ready`")
        out = x.new_empty((out_rows, *x.shape[1:]))
    elif tuple(out.shape) != (out_rows, *x.shape[1:]) or not out.is_contiguous():
        raise ValueError(f"fluid_all_to_all: out {tuple(out.shape)} != {(out_rows, *x.shape[1:])}")
    handle = comm.all_to_all_single(out, x, output_splits, input_splits, timing=timing, ready=ready)
    return out, handle


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, x, output_splits, input_splits, async_op, handle_box, ready, out_box):
        ctx.comm = comm
        ctx.output_splits, ctx.input_splits = output_splits, input_splits
        out, handle = _launch(
            comm,
            x,
            output_splits,
            input_splits,
            ready=ready,
            out=out_box.pop() if out_box else None,
        )
        if async_op:
            handle_box.append(handle)
        else:
            handle.wait()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        sched = ctx.comm.scheduler  # the model's (CommContext.scheduler)
        grad_in, handle = _launch(
            ctx.comm, grad_out, ctx.input_splits, ctx.output_splits, timing=sched.timing
        )
        sched.run_while(handle, ctx.comm)
        return None, grad_in, None, None, None, None, None, None


def fluid_all_to_all(
    comm: CommContext,
    x: torch.Tensor,
    output_splits: Optional[Sequence[int]] = None,
    input_splits: Optional[Sequence[int]] = None,
    *,
    async_op: bool = False,
    ready: Optional[torch.cuda.Event] = None,
    out: Optional[torch.Tensor] = None,
):
    """All-to-all over `comm.group` along dim 0.

    Args:
        comm: the CommContext of the group (owns the communication stream).
        x: `[sum(input_splits), ...]`.
        output_splits / input_splits: rows received from / sent to each rank (host ints, a list or
            a CPU tensor), or None for equal splits.
        async_op: return `(output, handle)` without waiting; the output must not be read before
            `handle.wait()`.
        ready: CUDA only: an event recorded on the compute stream after `x` was written. Without
            it one is recorded at the call, so the collective also waits for all compute queued
            before the call. Pass it to launch an all-to-all of an early input after later
            compute was queued (see CommContext.all_to_all_single); then `out` is required.
        out: the `[sum(output_splits), ...]` output, contiguous. With `ready` it must have been
            allocated before `ready` was recorded: memory allocated later may still be in use by
            compute queued after `ready`, which the collective does not wait for.

    Returns:
        `output` `[sum(output_splits), ...]`, or `(output, handle)` with `async_op=True`.
    """
    if comm.size == 1 and comm.emulated_link is None:  # nothing to send
        out = x
        return (out, CommHandle(0, waited=True)) if async_op else out
    box: list[CommHandle] = []
    res = _AllToAll.apply(
        comm,
        x,
        _as_list(output_splits),
        _as_list(input_splits),
        async_op,
        box,
        ready,
        [out] if out is not None else None,
    )
    if async_op:
        return res, box[0]
    return res
