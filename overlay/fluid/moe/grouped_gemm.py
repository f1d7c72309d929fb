"""Grouped GEMM over the local experts, with dX now and dW deferred to the BackwardScheduler.

Shape legend: G local experts (groups), T tokens (rows, expert-major: the rows of group g are
`[offs[g-1], offs[g])`), K input features, N output features.

`grouped_linear(x_TK, weight_GNK, counts, offs)` computes, for every group g,
`y[rows of g] = x[rows of g] @ weight[g]^T` (a per-expert `nn.Linear` without bias), i.e. what
Megatron's SequentialMLP does with one matmul per expert. Two implementations:

  - `torch._grouped_mm` (one kernel for all groups): CUDA, bf16, compute capability >= 9.0,
    when the caller passes `offs`;
  - a loop over `torch.split(x, counts)` (one cuBLAS GEMM per group) otherwise: CPU, fp32,
    older GPUs, and callers that pass `offs=None`. It is also the reference the fast path is
    tested against. A call that `torch._grouped_mm` rejects (its shape checks raise on the host,
    before any launch) takes the loop; the rejection is recorded in the caller's
    `GroupedMMFallbacks` (one per experts module) and logged once per module, and the next call
    tries the grouped kernel again.

Which one an MLP uses is `use_grouped_mm(x, counts, macs_per_row, mode)`, mode from
`--fluid-grouped-gemm` (FluidConfig.grouped_gemm): `auto`, the default, takes the grouped kernel
for many small experts and the loop for large ones, where one cuBLAS GEMM per expert is faster
(see LOOP_MIN_EXPERT_GFLOP); `on` / `off` force one of them.

Backward computes dX at once (the previous op needs it) and defers dW (a grouped `dy^T @ x`) as a
closure to the BackwardScheduler, which runs it while a later backward all-to-all is in flight;
where the scheduler defers nothing it returns dW to autograd instead (fluid.schedule.wgrad,
weights attached).
Zero-token groups give an all-zero dW (as SequentialMLP's per-expert linears do).

Under Megatron DDP with an fp32 `main_grad` (`--fluid-wgrad-accumulation` fused, and auto except
for grouped dW over many experts: `wgrad_mode_for`; fluid.schedule.wgrad.accumulation_kernel)
dW is not materialised: `gmm_wgrad_into` adds each group's `dy_g^T @ x_g` into `main_grad[g]`
inside its GEMM (one addmm per non-empty group; `torch._grouped_mm` cannot accumulate into an fp32
output), and the weight gets `grad_added_to_main_grad` and a placeholder gradient.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from fluid.moe.counts import HostCounts
from fluid.schedule import get_backward_scheduler
from fluid.schedule.main_grad_add import add_into, add_kernel
from fluid.schedule.wgrad import (
    accumulate_boxed_weight_grad,
    accumulate_into,
    accumulation_kernel,
    added_to_main_grad,
    attach,
    dw_probe,
    dw_wanted,
    engine_weight_grad,
    input_grad_wanted,
    mark_added_to_main_grad,
    weights_attached,
)

log = logging.getLogger(__name__)


# --fluid-grouped-gemm auto: one expert's MLP (fc1 + fc2, mean rows per expert) of at least this
# many GFLOP runs as one cuBLAS GEMM per expert instead of torch._grouped_mm. Measured points (2x H200,
# EP=2; docs/benchmarks/HISTORY.md):
# - Mixtral-like (H 4096, F 14336, about 2048 rows per expert): 721 GFLOP. Per-expert GEMMs are
#   faster: layer fwd+bwd 17.54 vs 18.65 ms (NVLink), 19.97 vs 21.29 ms under DDP main_grad.
# - the `small` benchmark model's layer (H 2048, F 5632, 2048 rows): 141 GFLOP. Per-expert is slower: the
#   layer under DDP 9.32 vs 7.50 ms, the whole model 611/508 vs 395/411 ms per iteration. The
#   GPU waits for the host there: each expert's GEMMs take about as long as the Python per
#   expert (the per-expert backward's timeline shows the GPU idle between experts).
# - 64 experts (H 2048, F 1408, top-6, about 768 rows per expert): 13 GFLOP; the loop 1.7x slower.
# 400 lies between 141 and 721 with a margin of about 2x on both sides.
LOOP_MIN_EXPERT_GFLOP = 400.0


class GroupedMMFallbacks:
    """Calls `torch._grouped_mm` rejected, for one experts module (FluidGroupedMLP owns one).

    Each rejected call takes the per-group loop; the first rejection is logged. `messages` holds
    every rejection's reason (benchmarks report it: a non-empty list means the numbers are not the
    grouped kernel's)."""

    def __init__(self, owner: str = ""):
        self.owner = owner
        self.messages: list[str] = []

    def record(self, exc: Exception) -> None:
        if not self.messages:
            log.warning(
                "FluidMoE %s: torch._grouped_mm failed (%s); this call uses the per-expert loop",
                self.owner,
                exc,
            )
        self.messages.append(str(exc))


def grouped_mm_available(x: torch.Tensor, mode: str = "auto") -> bool:
    """True where `torch._grouped_mm` can be used for `x` under `mode` (auto|on|off): CUDA bf16
    on compute capability >= 9.0, and mode not "off"."""
    return mode != "off" and _grouped_mm_supported(x)


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    """The hardware/dtype condition: CUDA bf16 on compute capability >= 9.0."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0)


def use_grouped_mm(
    x: torch.Tensor, counts: Sequence[int], macs_per_row: int, mode: str = "auto"
) -> bool:
    """Whether an expert MLP over `x` (rows grouped by `counts`) should use `torch._grouped_mm`.

    Args:
        macs_per_row: multiply-adds one row costs in one expert's MLP (fc1 + fc2), e.g.
            `H * F1 + F * H`.
        mode: `--fluid-grouped-gemm` (auto|on|off). With auto, False when the mean expert's MLP
            reaches LOOP_MIN_EXPERT_GFLOP.
    """
    if not grouped_mm_available(x, mode):
        return False
    if mode == "on" or not counts:
        return True
    mean_rows = x.shape[0] / len(counts)  # counts sum to the rows: no host value read
    return 2.0 * mean_rows * macs_per_row < LOOP_MIN_EXPERT_GFLOP * 1e9


def _try_grouped_mm(a, b, offs, fallbacks: Optional[GroupedMMFallbacks]):
    """torch._grouped_mm, or None if it rejects these operands (recorded in `fallbacks`)."""
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except RuntimeError as exc:  # shape/layout checks raise on the host, before any launch
        if fallbacks is None:
            raise
        fallbacks.record(exc)
        return None


def _takes_grouped_mm(x: torch.Tensor, offs) -> bool:
    """Whether `gmm` / `gmm_wgrad` try `torch._grouped_mm` for rows `x`: the caller passed
    `offs`, there are rows, and the device supports it."""
    return offs is not None and x.shape[0] > 0 and _grouped_mm_supported(x)


def _split(x: torch.Tensor, counts: Sequence[int]):
    return torch.split(x, list(counts), dim=0)


def gmm(
    a_TK: torch.Tensor,
    w: torch.Tensor,
    counts: Sequence[int],
    offs,
    *,
    trans_w: bool,
    fallbacks: Optional[GroupedMMFallbacks] = None,
):
    """Per group g: `a[g] @ w[g]^T` (trans_w, w `[G, N, K]`) or `a[g] @ w[g]` (w `[G, K, N]`).

    Args:
        a_TK: `[T, K]`, rows grouped by `counts` (host ints, one per group, summing to T).
        offs: int32 `[G]` cumulative counts on a_TK's device: use `torch._grouped_mm` where it
            is supported; None: the loop.
        fallbacks: where a rejected grouped call is recorded (then the loop runs); None: raise.
    """
    b = w.transpose(1, 2) if trans_w else w
    if _takes_grouped_mm(a_TK, offs):
        out = _try_grouped_mm(a_TK, b, offs, fallbacks)
        if out is not None:
            return out
    out = a_TK.new_empty((a_TK.shape[0], b.shape[2]))
    for g, (chunk, out_g) in enumerate(zip(_split(a_TK, counts), _split(out, counts), strict=True)):
        if chunk.shape[0]:  # straight into the output's rows: no torch.cat copy
            torch.matmul(chunk, b[g], out=out_g)
    return out


def gmm_wgrad(
    dy_TN: torch.Tensor,
    x_TK: torch.Tensor,
    counts: Sequence[int],
    offs,
    fallbacks: Optional[GroupedMMFallbacks] = None,
) -> torch.Tensor:
    """Per group g: `dy[g]^T @ x[g]`, returned as `[G, N, K]` (zero for empty groups); `offs`
    and `fallbacks` as in `gmm`."""
    num_groups = len(counts)
    if _takes_grouped_mm(x_TK, offs):
        dw = _try_grouped_mm(dy_TN.t(), x_TK, offs, fallbacks)
        if dw is not None:
            for g, c in enumerate(counts):  # empty groups: make the zero explicit
                if c == 0:
                    dw[g].zero_()
            return dw
    # Every non-empty group's slice is written whole by its GEMM: only empty groups need zeros
    # (a full zero fill of a Mixtral-sized dW costs 0.28 ms on H200).
    dw = x_TK.new_empty((num_groups, dy_TN.shape[1], x_TK.shape[1]))
    for g, (dy_g, x_g) in enumerate(zip(_split(dy_TN, counts), _split(x_TK, counts), strict=True)):
        if dy_g.shape[0]:
            torch.matmul(dy_g.t(), x_g, out=dw[g])
        else:
            dw[g].zero_()
    return dw


def gmm_wgrad_into(
    main_grad: torch.Tensor,
    dy_TN: torch.Tensor,
    x_TK: torch.Tensor,
    counts: Sequence[int],
    kernel: str,
) -> None:
    """Per group g: `main_grad[g] += dy[g]^T @ x[g]` in place (`main_grad` `[G, N, K]`), with
    `kernel` (fluid.schedule.wgrad.accumulation_kernel); empty groups add nothing."""
    for g, (dy_g, x_g) in enumerate(zip(_split(dy_TN, counts), _split(x_TK, counts), strict=True)):
        if dy_g.shape[0]:
            accumulate_into(main_grad[g], dy_g, x_g, kernel)


# --fluid-wgrad-accumulation auto: experts whose dW is one torch._grouped_mm stay unfused above
# this many local experts. Fused, dW is one addmm per expert (torch._grouped_mm cannot accumulate
# into an fp32 output): on 1 H200 that measured 1.106x with 8 local experts (Mixtral-like model)
# and 0.927x with 64 (the host-bound 64-expert model), docs/benchmarks/breakdown.md.
FUSED_WGRAD_MAX_GROUPS = 8


def wgrad_mode_for(mode: str, num_groups: int, grouped: bool) -> str:
    """The `--fluid-wgrad-accumulation` mode one grouped linear's dW uses: `auto` is unfused
    where dW would otherwise be one `torch._grouped_mm` (`grouped`) over more than
    FUSED_WGRAD_MAX_GROUPS experts; with per-expert GEMMs (`grouped` False) fusing adds no launch.
    `fused` and `unfused` as given."""
    if mode == "auto" and grouped and num_groups > FUSED_WGRAD_MAX_GROUPS:
        return "unfused"
    return mode


def added_into_main_grad(param: torch.nn.Parameter, box: list, mode: str) -> bool:
    """Under `--fluid-wgrad-accumulation auto`, add the unfused grouped dW in `box` (a
    one-element list) into `param.main_grad` with fluid.schedule.main_grad_add's vectorized kernel
    instead of handing it to autograd for Megatron DDP's `main_grad.add_` (the same sum, bitwise;
    1.5x the bandwidth on H200). Empties the box and returns True if it did; the caller then hands
    autograd a placeholder (`added_to_main_grad`). False (box untouched) for other modes, without
    an fp32 `main_grad`, or where no kernel applies (main_grad_add.add_kernel)."""
    if mode != "auto" or not param.requires_grad:
        return False
    main_grad = getattr(param, "main_grad", None)
    kernel = add_kernel(main_grad, box[0])
    if kernel is None or main_grad is None:
        return False
    add_into(main_grad, box.pop(), kernel)
    return True


class _GroupedLinear(torch.autograd.Function):
    """y = grouped x @ W^T. Backward: dX now, dW deferred (the weight arrives detached), or with
    the weight attached (nothing deferred, fluid.schedule.wgrad) returned to autograd."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight_in,
        probe,
        counts,
        offs,
        param_box,
        name,
        fallbacks,
        sched,
        attached,
        mode,
        merge,
    ):
        # param_box = (param,): a tuple, so autograd gives this node no edge to the parameter.
        # A bare Parameter argument would get one, and backward's None for it would run the
        # parameter's AccumulateGrad with no gradient: Megatron DDP's hook would then fire a
        # second time per backward (with overlap_grad_reduce: an assertion, or a bucket
        # reported ready before its dW exists). weight_in is the detached parameter, or, attached,
        # a view of it whose gradient backward returns; computed with detached (wgrad.attach).
        weight = weight_in.detach()
        ctx.save_for_backward(x, weight)
        (param,) = param_box
        ctx.counts, ctx.offs, ctx.param, ctx.name = counts, offs, param, name
        ctx.fallbacks, ctx.sched, ctx.attached = fallbacks, sched, attached
        ctx.mode = mode  # --fluid-wgrad-accumulation
        ctx.merge = merge  # a ChunkPart: this chunk's dW runs merged with the others' (chunk_wgrad)
        ctx.probe_index = None if probe is None else 2  # tensor inputs: x, weight, probe
        ctx.x_requires_grad = x.requires_grad
        return gmm(x, weight, counts, offs, trans_w=True, fallbacks=fallbacks)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        counts, offs, param, fallbacks = ctx.counts, ctx.offs, ctx.param, ctx.fallbacks
        ctx.param = None
        dy = dy.contiguous()
        dx = None
        if ctx.x_requires_grad:
            dx = gmm(dy, w, counts, offs, trans_w=False, fallbacks=fallbacks)
        none = [None] * 11
        full = dw_wanted(ctx, ctx.probe_index, "grouped_linear")  # False: e.g. autograd.grad
        mode = wgrad_mode_for(ctx.mode, len(counts), _takes_grouped_mm(x, offs))
        if ctx.attached and not input_grad_wanted(ctx, 1):
            return dx, *none
        if not full:
            if ctx.attached:  # the weight asked for directly: its plain dW (this chunk's)
                return dx, gmm_wgrad(dy, x, counts, offs, fallbacks), *none[1:]
            return dx, *none

        merged = None
        if ctx.merge is not None:  # forward chunks: one dW over all of them (chunk_wgrad)
            merged = ctx.merge.add(x, dy)
            ctx.merge = None
            if merged is None:  # not the last chunk in: its rows wait for the others
                return dx, *none
            counts = merged.counts
            offs = offsets_for(counts, x.device) if offs is not None else None

        # decided here, not in the task: a refused `fused` raises from this backward
        kernel = accumulation_kernel(param, w.device, mode)

        def compute_dw() -> list:
            """The dW, added into main_grad where a kernel does that (returns []), else boxed
            (`[dW]`) for the caller to hand over."""
            x_, dy_ = merged.gather() if merged is not None else (x, dy)
            if kernel is not None:
                gmm_wgrad_into(param.main_grad, dy_, x_, counts, kernel)
                return []
            dw = [gmm_wgrad(dy_, x_, counts, offs, fallbacks)]
            return [] if added_into_main_grad(param, dw, ctx.mode) else dw

        if ctx.attached:
            box: list = []  # a training backward: one inline scheduler task, as with deferral

            def settle():
                dw = compute_dw()
                box.append(engine_weight_grad(param, dw.pop()) if dw else added_to_main_grad(param))

            ctx.sched.run_inline(settle, ctx.name)
            return dx, box.pop(), *none[1:]

        def dw_task():
            if not param.requires_grad:
                return
            dw = compute_dw()
            if dw:
                accumulate_boxed_weight_grad(param, dw)
            else:
                mark_added_to_main_grad(param)

        ctx.sched.defer(dw_task, ctx.name)
        return dx, *none


def grouped_linear(
    x_TK: torch.Tensor,
    weight_GNK: torch.nn.Parameter,
    counts: Sequence[int],
    offs: Optional[torch.Tensor],
    *,
    name: str = "",
    fallbacks: Optional[GroupedMMFallbacks] = None,
    scheduler=None,
    wgrad_accumulation: str = "auto",
    merge=None,
) -> torch.Tensor:
    """`[T, K]` -> `[T, N]` with one `[N, K]` weight per group; dW goes through `scheduler` (the
    model's BackwardScheduler; default `get_backward_scheduler()`), or, where that scheduler
    defers nothing, to autograd (fluid.schedule.wgrad.weights_attached). `offs` None: the
    per-group loop; `fallbacks`: see `gmm`; `wgrad_accumulation`: `--fluid-wgrad-accumulation`
    (module doc); `merge`: a forward chunk's `fluid.moe.chunk_wgrad.ChunkPart`, whose dW runs
    once over every chunk's rows when the last chunk's backward hands its rows over."""
    sched = get_backward_scheduler() if scheduler is None else scheduler
    attached = weights_attached(sched)
    # The probe (fluid.schedule.wgrad.dw_probe) tells backward whether dW is wanted, and keeps
    # the op in the graph when x needs no gradient, so dW still runs then.
    return _GroupedLinear.apply(
        x_TK,
        attach(weight_GNK, attached),
        dw_probe(weight_GNK),
        counts if isinstance(counts, HostCounts) else tuple(int(c) for c in counts),
        offs,
        (weight_GNK,),
        name,
        fallbacks,
        sched,
        attached,
        wgrad_accumulation,
        merge,
    )


def offsets_for(counts: Sequence[int], device) -> Optional[torch.Tensor]:
    """int32 cumulative counts on `device` for `torch._grouped_mm`, or None on CPU.

    The host list goes through pinned memory with a non-blocking copy, so this never
    synchronizes the device.
    """
    if torch.device(device).type != "cuda":
        return None
    acc, out = 0, []
    for c in counts:
        acc += int(c)
        out.append(acc)
    host = torch.tensor(out, dtype=torch.int32).pin_memory()
    return host.to(device, non_blocking=True)
