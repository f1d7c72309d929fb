"""Weight gradients of Fluid ops: how dW reaches autograd, DDP and the optimizer.

A Fluid op (`deferred_linear` here, fluid.moe.grouped_gemm.grouped_linear,
fluid.moe.expert_loop.sequential_experts) connects its weights to autograd in one of two ways,
fixed when it runs forward by its model's BackwardScheduler (`weights_attached`).

Scheduler on (the default): dW deferred. The op passes its weights to its autograd Function
*detached*, so the autograd graph has no edge to the weight and the engine never calls the
weight's AccumulateGrad during the main backward. It must not: a node of the graph runs once the
op's backward has returned, before the deferred dW exists, and with no gradient it would still fire
every hook on it, Megatron DDP's per-parameter hook among them (with `overlap_grad_reduce` an
assertion, or a bucket reduced too early). The dW closure then calls
`accumulate_weight_grad(param, dW)`, which runs a tiny backward into the parameter's
AccumulateGrad: it adds `dW` into `param.grad` (adopting the tensor, not copying it, when
`param.grad` is None) and fires every hook registered on it, exactly as
stock Megatron's linears do with `gradient_accumulation_fusion=False`:
  - no DDP: `param.grad` accumulates across micro-batches as in plain PyTorch;
  - Megatron DDP: its hook adds `param.grad` into the fp32 `param.main_grad`, clears `param.grad`,
    and with `overlap_grad_reduce` reports the parameter ready to its bucket.

Scheduler off (`--no-fluid-scheduler`): every dW would run inline in the op's backward anyway, so
the op takes its weights as autograd inputs (views of them, see `input_grad_wanted`) and returns
dW to the engine as a stock layer does: the engine runs each weight's AccumulateGrad (and DDP's
hook) once, with the dW. The values are the same GEMMs as with the scheduler on, bit for bit.

With `gradient_accumulation_fusion` and a `main_grad` (DDP), `fused_accumulate` writes dW straight
into `main_grad` with apex's fused kernel when it is installed, marks `grad_added_to_main_grad`, and
fires the hooks with a placeholder gradient, as Megatron's LinearWithGradAccumulation does. Without
the kernel it falls back to the unfused path above (with a one-time warning). FluidGroupedMLP's
per-expert path (fluid.moe.expert_loop) adds each expert's dW into `main_grad` the same way. Once a
parameter's flag is set, every later dW of the step goes into `main_grad` directly as well
(`engine_weight_grad`): the hook would skip it.

Which backward passes compute dW. A stock layer computes dW exactly when autograd asks for the
weight's gradient: `loss.backward()` does, `torch.autograd.grad(out, x)` and
`out.backward(inputs=[x])` do not (a gradient penalty, an attribution pass), so those leave
`.grad` and DDP's `main_grad` alone. A Fluid op's `ctx.needs_input_grad` cannot say so (it is
True whenever the weight requires grad, and with the scheduler on the node has no edge to the
weight at all). Each Fluid op therefore also takes its weight's *probe* (`dw_probe`): an empty
leaf that requires grad and belongs to no `inputs=` list. Its AccumulateGrad node is in the graph,
and the engine executes it only in a backward pass that computes every leaf's gradient (no
`inputs=`: `loss.backward()`, Megatron's pipeline schedules, reentrant checkpointing's inner
backward). In backward the op asks `dw_wanted(ctx, probe_index)`
(`torch._C._will_engine_execute_node`, what `torch.autograd.graph.register_multi_grad_hook` uses
for the same question): True there, False under `autograd.grad` and `backward(inputs=...)`. Then:
  - scheduler on: the op returns dX only and hands no dW to the scheduler;
  - scheduler off: the op returns dW for each weight autograd asked for (`input_grad_wanted`:
    `autograd.grad(out, [w])`, `autograd.grad(out, [x, w])`, `backward(inputs=[w])`), computed
    at once, plain (no `main_grad`, no fused kernel: autograd.grad hands it to the caller, and
    backward(inputs=) to AccumulateGrad and DDP's hook, as a stock layer with
    `gradient_accumulation_fusion=False` does), and no scheduler task.
The probe gets no gradient (its AccumulateGrad runs with none and does nothing).

Limits:
  - with the scheduler on, a Fluid weight cannot be asked for directly:
    `torch.autograd.grad(out, [w])` raises autograd's "One of the differentiated Tensors appears
    to not have been used in the graph", and `out.backward(inputs=[w])` leaves `w.grad` None.
    Autograd answers those only for a weight whose AccumulateGrad is in the graph, and such a
    node would run in every full backward before the deferred dW exists (see above). Build the
    model with `--no-fluid-scheduler` for them, or read `w.grad` after a full backward;
  - double backward is refused (`dw_wanted` raises under `create_graph=True`): a Fluid op's
    backward is not differentiable through its weights (detached with the scheduler on), so
    second-order terms through them (a gradient penalty's effect on them) would silently be
    missing.
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
    box.append(engine_weight_grad(param, box.pop()))
    _hand_over(param, box)


def engine_weight_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """What AccumulateGrad should receive for `param` in a training backward, given its dW.

    `grad` in param's dtype; or, once an earlier dW of this step went straight into `main_grad`
    (fused_accumulate, fluid.moe.expert_loop) and set `grad_added_to_main_grad`, a placeholder
    after adding `grad` into `main_grad` here: Megatron DDP's hook skips its add until
    zero_grad_buffer clears the flag, so the dW would otherwise be lost. Pass a temporary, as to
    `accumulate_weight_grad`.
    """
    if hasattr(param, "main_grad") and getattr(param, "grad_added_to_main_grad", False):
        param.main_grad.add_(grad)
        return torch.empty_like(param)  # what the hook needs: a gradient, any values
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


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
    _hand_over(param, [fused_into_main_grad(param, x_2d, dy_2d)])


def fused_into_main_grad(
    param: torch.nn.Parameter, x_2d: torch.Tensor, dy_2d: torch.Tensor
) -> torch.Tensor:
    """`param.main_grad += dy_2d^T @ x_2d` in place (apex kernel); returns the placeholder
    gradient for AccumulateGrad (`added_to_main_grad`)."""
    # main_grad is Megatron DDP's attribute, set on the Parameter at run time (untyped).
    main_grad = param.main_grad  # type: ignore[attr-defined]
    if main_grad.dtype == torch.float32:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x_2d, dy_2d, main_grad)
    else:
        fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(x_2d, dy_2d, main_grad)
    return added_to_main_grad(param)


def mark_added_to_main_grad(param: torch.nn.Parameter) -> None:
    """After dW went straight into `param.main_grad`: set `grad_added_to_main_grad` and fire the
    parameter's hooks with a placeholder gradient, as Megatron's LinearWithGradAccumulation does.
    """
    _hand_over(param, [added_to_main_grad(param)])


def added_to_main_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """Set `grad_added_to_main_grad` (dW went straight into `param.main_grad`) and return the
    placeholder gradient AccumulateGrad gets instead of dW.

    Megatron DDP's hook skips its add when the flag is set (until `zero_grad_buffer` clears it)
    and only needs a gradient to be present; it sets `param.grad = None` right after, so the
    placeholder (uninitialized, param-sized) lives only during the hook.
    """
    param.grad_added_to_main_grad = True  # type: ignore[attr-defined]  # Megatron's run-time flag
    return torch.empty_like(param)


def weights_attached(scheduler) -> bool:
    """Whether a Fluid op running forward now takes its weights as autograd inputs: when
    `scheduler` (its model's BackwardScheduler) is disabled (see the module docstring)."""
    return not scheduler.enabled


def attach(param: Optional[torch.Tensor], attached: bool) -> Optional[torch.Tensor]:
    """What a Fluid op passes to its autograd Function for `param`: a view (`attached`, an edge
    to the parameter through a view node, see `input_grad_wanted`) or the detached tensor.

    The Function computes with the view detached again: ops such as torch.matmul pick their
    kernels by whether an operand requires grad, and the two ways must give the same bits."""
    if param is None:
        return None
    return param.view_as(param) if attached else param.detach()


def input_grad_wanted(ctx, index: int) -> bool:
    """In a Fluid op's backward: will autograd use the gradient returned for the op's tensor input
    `index` (counted as for `dw_probe`) in this backward call? False for an input with no edge
    (detached, or requiring no grad).

    An attached weight is passed as a view, so its edge leads to the view's node and not to the
    parameter's AccumulateGrad: `_will_engine_execute_node` refuses a leaf's node under
    `torch.autograd.grad` when that leaf is one of the requested inputs.
    """
    node = ctx.next_functions[index][0]
    return node is not None and torch._C._will_engine_execute_node(node)


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
    in a backward pass that computes weight gradients (`dw_wanted`); with the weights attached
    (scheduler off) returned to autograd instead (`_attached_linear_grads`)."""

    @staticmethod
    def forward(ctx, x, weight_in, bias_in, probe, params, name, fusion, sched, attached):
        # Computed with the detached weight either way: torch.matmul folds `[s, b, in]` into one
        # mm when the weight requires grad and may take bmm otherwise, so an attached weight
        # would change the bits of y and dX (see `attach`).
        w = weight_in.detach()
        ctx.save_for_backward(x, w)
        ctx.params, ctx.name, ctx.fusion, ctx.sched = params, name, fusion, sched
        ctx.attached = attached
        ctx.x_requires_grad = x.requires_grad
        # one edge per tensor input: x, the weight, the bias when given, the probe
        ctx.bias_index = None if bias_in is None else 2
        ctx.probe_index = None if probe is None else 2 + (bias_in is not None)
        y = torch.matmul(x, w.t())
        if bias_in is not None:
            y = y + bias_in.detach()
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        ctx.params = None  # the closure below keeps what it needs; drop the rest now
        dx = torch.matmul(dy, w) if ctx.x_requires_grad else None
        full = dw_wanted(ctx, ctx.probe_index, "a Fluid linear")
        if ctx.attached:
            return dx, *_attached_linear_grads(ctx, x, dy, weight, bias, full), *[None] * 6
        if not full:
            return dx, *[None] * 8
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

        ctx.sched.defer(dw_task, ctx.name)
        return dx, *[None] * 8


def _attached_linear_grads(ctx, x, dy, weight, bias, full: bool) -> tuple:
    """(dW, db) an attached `_DeferredLinear` returns: None for what autograd does not ask for.

    In a training backward (`full`) the same values and Megatron rules as the deferred path
    (fused kernel into `main_grad`, `engine_weight_grad`), computed now as one inline scheduler
    task; for a weight asked for directly, the plain dW and no task (module docstring).
    """
    want_w = input_grad_wanted(ctx, 1)
    want_b = ctx.bias_index is not None and input_grad_wanted(ctx, ctx.bias_index)
    if not (want_w or want_b):
        return None, None
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    if not full:
        return (torch.matmul(dy2.t(), x2) if want_w else None), (dy2.sum(0) if want_b else None)
    grads: list = [None, None]

    def dw_task():
        if want_w:
            if wants_fused_accumulation(weight, ctx.fusion):
                grads[0] = fused_into_main_grad(weight, x2, dy2)
            else:
                grads[0] = engine_weight_grad(weight, torch.matmul(dy2.t(), x2))
        if want_b:
            grads[1] = engine_weight_grad(bias, dy2.sum(0))

    ctx.sched.run_inline(dw_task, ctx.name)
    return grads[0], grads[1]


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
    """`x @ weight^T + bias` whose weight/bias gradients go through the BackwardScheduler, or,
    with that scheduler disabled, to autograd as a stock linear's do (`weights_attached`).

    Args:
        x: `[..., in]`; weight: `[out, in]`; bias: `[out]` or None. Returns `[..., out]`.
        name: label for stats and debugging.
        scheduler: the BackwardScheduler that takes the dW (default `get_backward_scheduler()`).
    """
    sched = _scheduler(scheduler)
    attached = weights_attached(sched)
    # The probe also keeps this op in the backward graph when x needs no gradient (a detached
    # weight gives the output no grad_fn otherwise), so dW still runs then.
    return _DeferredLinear.apply(
        x,
        attach(weight, attached),
        attach(bias, attached),
        dw_probe(weight, bias),
        (weight, bias),
        name,
        gradient_accumulation_fusion,
        sched,
        attached,
    )
