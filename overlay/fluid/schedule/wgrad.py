"""Deferred weight gradients: how a dW closure hands its result to autograd, DDP and the optimizer.

Fluid ops pass their weights to their autograd Functions *detached*, so the autograd graph has no
edge to the weight and the engine never calls the weight's AccumulateGrad during the main backward
(if it did with a None gradient, Megatron DDP's per-parameter hook would fire before the dW exists:
with `overlap_grad_reduce` that is an assertion, or a bucket reduced too early). The dW closure
then calls `accumulate_weight_grad(param, dW)`, which runs a tiny backward into the parameter's
AccumulateGrad: it adds `dW` into `param.grad` (adopting the tensor, not copying it, when
`param.grad` is None) and fires every hook registered on it, exactly as
stock Megatron's linears do with `gradient_accumulation_fusion=False`:
  - no DDP: `param.grad` accumulates across micro-batches as in plain PyTorch;
  - Megatron DDP: its hook adds `param.grad` into the fp32 `param.main_grad`, clears `param.grad`,
    and with `overlap_grad_reduce` reports the parameter ready to its bucket.

With `gradient_accumulation_fusion` and a `main_grad` (DDP), `fused_accumulate` writes dW straight
into `main_grad` with apex's fused kernel when it is installed, marks `grad_added_to_main_grad`, and
fires the hooks with a placeholder gradient, as Megatron's LinearWithGradAccumulation does. Without
the kernel it falls back to the unfused path above (with a one-time warning). FluidGroupedMLP's
per-expert path (fluid.moe.expert_loop) adds each expert's dW into `main_grad` the same way. Once a
parameter's flag is set, every later dW of the step goes into `main_grad` directly as well
(`accumulate_boxed_weight_grad`): the hook would skip it.

Which backward passes compute dW. A stock layer computes dW exactly when autograd asks for the
weight's gradient: `loss.backward()` does, `torch.autograd.grad(out, x)` and
`out.backward(inputs=[x])` do not (a gradient penalty, an attribution pass), so those leave
`.grad` and DDP's `main_grad` alone. A Fluid op's autograd node has no edge to its weights, so the
engine cannot say so through `ctx.needs_input_grad` (which is True whenever the weight requires
grad). Each Fluid op therefore also takes its weight's *probe* (`dw_probe`): an empty leaf that
requires grad and belongs to no `inputs=` list. Its AccumulateGrad node is in the graph, and the
engine executes it only in a backward pass that computes every leaf's gradient (no `inputs=`:
`loss.backward()`, Megatron's pipeline schedules, reentrant checkpointing's inner backward). In
backward the op asks `dw_wanted(ctx, probe_index)` (`torch._C._will_engine_execute_node`, what
`torch.autograd.graph.register_multi_grad_hook` uses for the same question): True there, False
under `autograd.grad` and `backward(inputs=...)`, where the op then returns dX only and hands no dW
to the scheduler. The probe gets no gradient (its AccumulateGrad runs with none and does nothing).

Limits that follow from the detached weight (the reason for it is above; an edge to the weight
would run its AccumulateGrad, and Megatron DDP's hook, when the op's backward returns, before the
deferred dW exists):
  - a Fluid weight cannot be asked for directly: `torch.autograd.grad(out, [w])` raises autograd's
    "One of the differentiated Tensors appears to not have been used in the graph", and
    `out.backward(inputs=[w])` leaves `w.grad` None. Read `w.grad` after a full backward instead;
  - double backward is refused (`dw_wanted` raises under `create_graph=True`): the dX a Fluid op
    returns does not depend on its weight in the autograd graph, so second-order terms through
    the weights (a gradient penalty's effect on them) would silently be missing.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

try:  # apex's fused wgrad kernel; absent on the project's GPU image
    import fused_weight_gradient_mlp_cuda  # type: ignore

    HAVE_FUSED_WGRAD = True
except ImportError:
    fused_weight_gradient_mlp_cuda = None
    HAVE_FUSED_WGRAD = False

_warned_no_fusion = False


class _HandOver(torch.autograd.Function):
    """A scalar whose backward returns the boxed gradient for `param`: the only way into
    AccumulateGrad that leaves no Python reference to the gradient while it runs.

    AccumulateGrad takes ownership of a new gradient (no copy) only when nothing else refers to
    it; `torch.autograd.backward(param, grad)` keeps the caller's `grad` alive through the call,
    so the engine cloned every dW (a second dW-sized buffer, plus a copy kernel, per backward
    under Megatron DDP, which clears `param.grad` after each hook). Here the gradient sits in a
    one-element list that backward empties: once the engine holds it, nothing else does.
    """

    @staticmethod
    def forward(ctx, param, box):
        ctx.box = box
        return param.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        box, ctx.box = ctx.box, None
        return box.pop(), None


def accumulate_weight_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Give `grad` (same shape as `param`) to autograd as `param`'s gradient (see module doc).

    Pass a temporary (`accumulate_weight_grad(w, dy.t() @ x)`): when the caller keeps no reference,
    AccumulateGrad adopts the tensor as `param.grad` instead of copying it (see `_HandOver`).
    """
    box = [grad]
    del grad
    accumulate_boxed_weight_grad(param, box)


def accumulate_boxed_weight_grad(param: torch.nn.Parameter, box: list) -> None:
    """`accumulate_weight_grad` for a gradient held only by the one-element list `box`.

    For callers that computed dW earlier and must keep it somewhere until the hand-over: the list
    is emptied here, so once the engine holds the tensor nothing else does (adopted, not copied).
    """
    if not param.requires_grad:
        box.clear()
        return
    if hasattr(param, "main_grad") and getattr(param, "grad_added_to_main_grad", False):
        # An earlier dW of this step went straight into main_grad (fused_accumulate, or
        # fluid.moe.expert_loop) and set the flag, so Megatron DDP's hook will skip its add until
        # zero_grad_buffer: this dW must go in directly too, or it would be lost.
        param.main_grad.add_(box.pop())
        box.append(torch.empty_like(param))  # what the hook needs: a gradient, any values
    elif box[0].dtype != param.dtype:
        box[0] = box[0].to(param.dtype)
    _hand_over(param, box)


def _hand_over(param: torch.nn.Parameter, box: list) -> None:
    """Run param's AccumulateGrad (and its hooks) on the tensor in `box`, emptying the box."""
    with torch.enable_grad():
        out = _HandOver.apply(param, box)
    torch.autograd.backward(out)


def wants_fused_accumulation(param: torch.nn.Parameter, gradient_accumulation_fusion: bool) -> bool:
    """True where dW should be written straight into `param.main_grad` by apex's kernel."""
    global _warned_no_fusion
    if not (gradient_accumulation_fusion and hasattr(param, "main_grad")):
        return False
    if not HAVE_FUSED_WGRAD or param.main_grad.dtype not in (torch.float32, torch.float16):
        if not _warned_no_fusion:
            log.warning(
                "FluidMoE: gradient_accumulation_fusion requested but apex's "
                "fused_weight_gradient_mlp_cuda is not installed: using unfused dW accumulation"
            )
            _warned_no_fusion = True
        return False
    return True


def fused_accumulate(param: torch.nn.Parameter, x_2d: torch.Tensor, dy_2d: torch.Tensor) -> None:
    """`param.main_grad += dy_2d^T @ x_2d` in place (apex kernel), then fire param's hooks."""
    # main_grad is Megatron DDP's attribute, set on the Parameter at run time (untyped).
    main_grad = param.main_grad  # type: ignore[attr-defined]
    if main_grad.dtype == torch.float32:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x_2d, dy_2d, main_grad)
    else:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(x_2d, dy_2d, main_grad)
    mark_added_to_main_grad(param)


def mark_added_to_main_grad(param: torch.nn.Parameter) -> None:
    """After dW went straight into `param.main_grad`: set `grad_added_to_main_grad` and fire the
    parameter's hooks with a placeholder gradient, as Megatron's LinearWithGradAccumulation does.

    Megatron DDP's hook skips its add when the flag is set (until `zero_grad_buffer` clears it)
    and only needs a gradient to be present; it sets `param.grad = None` right after, so the
    placeholder (uninitialized, param-sized) lives only during the hook.
    """
    param.grad_added_to_main_grad = True  # type: ignore[attr-defined]  # Megatron's run-time flag
    _hand_over(param, [torch.empty_like(param)])


def dw_probe(*params: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The probe leaf a Fluid op takes as an extra input for `dw_wanted` (see the module doc).

    One per parameter, kept on the first of `params` that requires grad (the parameter belongs
    to the model, so does its probe), on that parameter's device; None when none requires grad.
    """
    for p in params:
        if p is not None and p.requires_grad:
            probe = getattr(p, "_fluid_dw_probe", None)
            if probe is None or probe.device != p.device:
                probe = torch.empty(0, device=p.device, requires_grad=True)
                p._fluid_dw_probe = probe  # type: ignore[attr-defined]  # kept on the Parameter
            return probe
    return None


CREATE_GRAPH_UNSUPPORTED = (
    "FluidMoE: {} does not support create_graph=True (double backward): its dX is computed "
    "with the weight detached, so the second-order terms through the weights would be missing. "
    "Build the model without --use-fluid-moe for higher-order gradients."
)


def dw_wanted(ctx, probe_index: Optional[int], op: str = "this Fluid op") -> bool:
    """In a Fluid op's backward: does this backward pass compute weight gradients?

    `probe_index`: where the op's `dw_probe` is among its forward's *tensor* inputs (autograd
    keeps one edge per tensor input; a None argument has none), or None when it had no probe (no
    weight requires grad): then False. True in a backward without `inputs=` (loss.backward()),
    False under `torch.autograd.grad` and `backward(inputs=...)`; see the module docstring.
    Raises under create_graph=True, which Fluid ops do not support.
    """
    if torch.is_grad_enabled():  # the engine runs nodes in grad mode only for create_graph=True
        raise RuntimeError(CREATE_GRAPH_UNSUPPORTED.format(op))
    if probe_index is None:
        return False
    return torch._C._will_engine_execute_node(ctx.next_functions[probe_index][0])


class _DeferredLinear(torch.autograd.Function):
    """y = x @ W^T (+ b). Backward: dX now; dW (and db) deferred to the BackwardScheduler, only
    in a backward pass that computes weight gradients (`dw_wanted`)."""

    @staticmethod
    def forward(ctx, x, weight_detached, bias_detached, probe, params, name, fusion, sched):
        ctx.save_for_backward(x, weight_detached)
        ctx.params, ctx.name, ctx.fusion, ctx.sched = params, name, fusion, sched
        ctx.x_requires_grad = x.requires_grad
        # the probe's edge: after x, the weight and (when given) the bias
        ctx.probe_index = None if probe is None else 2 + (bias_detached is not None)
        y = torch.matmul(x, weight_detached.t())
        if bias_detached is not None:
            y = y + bias_detached
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        ctx.params = None  # the closure below keeps what it needs; drop the rest now
        dx = torch.matmul(dy, w) if ctx.x_requires_grad else None
        if not dw_wanted(ctx, ctx.probe_index, "a Fluid linear"):
            return dx, None, None, None, None, None, None, None
        fusion = ctx.fusion

        def dw_task(x=x, dy=dy):
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            if weight.requires_grad:
                if wants_fused_accumulation(weight, fusion):
                    fused_accumulate(weight, x2, dy2)
                else:
                    accumulate_weight_grad(weight, torch.matmul(dy2.t(), x2))
            if bias is not None and bias.requires_grad:
                accumulate_weight_grad(bias, dy2.sum(0))

        _scheduler(ctx.sched).defer(dw_task, ctx.name)
        return dx, None, None, None, None, None, None, None


def _scheduler(sched):
    if sched is not None:
        return sched
    from fluid.schedule.scheduler import get_backward_scheduler

    return get_backward_scheduler()


def deferred_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.nn.Parameter] = None,
    *,
    name: str = "",
    gradient_accumulation_fusion: bool = False,
    scheduler=None,
) -> torch.Tensor:
    """`x @ weight^T + bias` whose weight/bias gradients go through the BackwardScheduler.

    Args:
        x: `[..., in]`; weight: `[out, in]`; bias: `[out]` or None. Returns `[..., out]`.
        name: label for stats and debugging.
        scheduler: the BackwardScheduler that takes the dW (default `get_backward_scheduler()`).
    """
    # The probe also keeps this op in the backward graph when x needs no gradient (the weight
    # is detached, so the output would not require grad), so dW still runs then.
    return _DeferredLinear.apply(
        x,
        weight.detach(),
        None if bias is None else bias.detach(),
        dw_probe(weight, bias),
        (weight, bias),
        name,
        gradient_accumulation_fusion,
        scheduler,
    )
