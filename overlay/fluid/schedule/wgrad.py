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

Scheduler off (`--no-fluid-scheduler`), or on with nothing to defer into (the auto policy over
NVLink, `BackwardScheduler.defers_dw`): every dW would run inline in the op's backward anyway, so
the op takes its weights as autograd inputs (views of them, see `input_grad_wanted`) and returns
dW to the engine as a stock layer does: the engine runs each weight's AccumulateGrad (and DDP's
hook) once, with the dW. The values are the same GEMMs as with the scheduler on, bit for bit.

Fused accumulation (`--fluid-wgrad-accumulation`, `accumulation_kernel`). Under Megatron DDP a
parameter has an fp32 `main_grad`; the unfused path above hands a bf16 dW to autograd and DDP's hook
adds it into `main_grad` with a separate elementwise kernel (without apex the largest kernel of a
training step on 1 H200: 184.9 of 1165.8 ms, Mixtral-like; docs/benchmarks/breakdown.md). Fused
(auto, the default, wherever `main_grad` is fp32): the dW GEMM adds into `main_grad` itself, with
apex's kernel under `gradient_accumulation_fusion` when apex is installed, else torch's
`addmm(out_dtype=float32)` on CUDA, else `accumulate_reference` (CPU); then
`grad_added_to_main_grad` is set and the hooks fire with a placeholder gradient, as Megatron's
LinearWithGradAccumulation does. The experts (fluid.moe.grouped_gemm, fluid.moe.expert_loop) add
each expert's dW into its slice `main_grad[g]` the same way, except under auto where dW is one
grouped GEMM over more than 8 local experts (fluid.moe.grouped_gemm.wgrad_mode_for: one addmm
per expert measured slower there); that bf16 dW FluidMoE adds into `main_grad` itself with one
vectorized pass where it can (fluid.schedule.main_grad_add, same sum as DDP's add). Once a
parameter's flag is set, every later unfused dW of the step goes into `main_grad` directly as
well (`engine_weight_grad`): the hook would skip it. Scheduler on and off run the same kernel on the same operands.

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

import functools
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
        return param.new_empty(())  # never read (backward ignores it): no fill kernel

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
    # an explicit (unread) seed: backward(out) alone would launch a ones_like fill kernel
    torch.autograd.backward(out, out.detach())


WGRAD_ACCUMULATION_MODES = ("auto", "fused", "unfused")


@functools.cache
def torch_fused_kernel_available() -> bool:
    """Whether this torch has `torch.addmm(..., out_dtype=)` (`aten::addmm.dtype_out`, CUDA).
    Asked per parameter in every backward; the answer is fixed for the process, so cached."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def fused_kernel_available(gradient_accumulation_fusion: bool) -> bool:
    """Whether a fused dW kernel exists in this process (what `--fluid-wgrad-accumulation fused`
    needs at build time): apex's with `gradient_accumulation_fusion`, or torch's out_dtype addmm."""
    return (gradient_accumulation_fusion and HAVE_FUSED_WGRAD) or torch_fused_kernel_available()


def accumulation_kernel(
    param: torch.nn.Parameter,
    device: torch.device,
    mode: str = "auto",
    gradient_accumulation_fusion: bool = False,
) -> Optional[str]:
    """How a training backward's dW of `param` (computed on `device`) reaches `main_grad`.

    Returns None (unfused: dW in param's dtype handed to autograd, Megatron DDP's hook adds it
    into `main_grad`) or the kernel that adds dW into `main_grad` inside the GEMM (fused; the
    parameter then gets a placeholder gradient, see `added_to_main_grad`):
      - "apex": `gradient_accumulation_fusion` and apex's fused_weight_gradient_mlp_cuda (fp32 or
        fp16 `main_grad`, CUDA), as Megatron's LinearWithGradAccumulation;
      - "torch": `torch.addmm(main_grad, dy^T, x, out_dtype=float32, out=main_grad)` (fp32
        `main_grad`, CUDA);
      - "reference": `accumulate_reference` (fp32 `main_grad`, any other device: CPU tests run
        the whole protocol through it).

    `mode` is `--fluid-wgrad-accumulation`: "unfused" always None; "auto" fused wherever the
    parameter has an fp32 `main_grad` (or apex applies), else None; "fused" as auto, but raises
    FluidConfigError (naming the flag) where auto would give None. Why fused: without apex the
    unfused add of every bf16 dW into the fp32 `main_grad` was the largest kernel of a training
    step on 1 H200 (184.9 of 1165.8 ms, Mixtral-like, 8 micro-batches; docs/benchmarks/breakdown.md).
    """
    if mode == "unfused" or not param.requires_grad:
        return None
    main_grad = getattr(param, "main_grad", None)
    on_cuda = torch.device(device).type == "cuda"
    if gradient_accumulation_fusion and main_grad is not None:
        if HAVE_FUSED_WGRAD and on_cuda and main_grad.dtype in (torch.float32, torch.float16):
            return "apex"
        _warn_no_apex()
    if main_grad is not None and main_grad.dtype == torch.float32:
        if not on_cuda:
            return "reference"
        if torch_fused_kernel_available():
            return "torch"
    if mode == "fused":
        from fluid.config import FluidConfigError, flag

        have = "no main_grad" if main_grad is None else f"main_grad {main_grad.dtype}"
        raise FluidConfigError(
            f"{flag('wgrad_accumulation')} fused needs an fp32 main_grad (Megatron DDP with "
            f"fp32 gradient accumulation) and a fused kernel on {device}; a weight "
            f"{tuple(param.shape)} has {have}: use {flag('wgrad_accumulation')} auto"
        )
    return None


def _warn_no_apex() -> None:
    global _warned_no_fusion
    if HAVE_FUSED_WGRAD or _warned_no_fusion:
        return
    log.warning(
        "FluidMoE: gradient_accumulation_fusion requested but apex's fused_weight_gradient_mlp_cuda "
        "is not installed: dW accumulation follows --fluid-wgrad-accumulation (auto: torch's "
        "fused addmm into an fp32 main_grad)"
    )
    _warned_no_fusion = True


def accumulate_reference(main_grad: torch.Tensor, dy_2d: torch.Tensor, x_2d: torch.Tensor) -> None:
    """`main_grad += dy_2d^T @ x_2d` computed in fp32: the reference of the fused kernels.

    main_grad `[N, K]` fp32; dy_2d `[T, N]`, x_2d `[T, K]` in any float dtype (upcast first, so
    the product is not rounded to a reduced precision before the add)."""
    main_grad.add_(torch.matmul(dy_2d.float().t(), x_2d.float()))


def accumulate_into(
    main_grad: torch.Tensor, dy_2d: torch.Tensor, x_2d: torch.Tensor, kernel: str
) -> None:
    """`main_grad += dy_2d^T @ x_2d` in place with `kernel` (see `accumulation_kernel`).

    main_grad `[N, K]` (a parameter's, or one expert's slice of a stacked one), dy_2d `[T, N]`,
    x_2d `[T, K]`; T may be 0 (nothing added)."""
    if dy_2d.shape[0] == 0:
        return
    if kernel == "apex":
        if main_grad.dtype == torch.float32:
            fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(x_2d, dy_2d, main_grad)
        else:
            fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(x_2d, dy_2d, main_grad)
    elif kernel == "torch":
        if dy_2d.dtype == main_grad.dtype:
            main_grad.addmm_(dy_2d.t(), x_2d)
        else:  # bf16/fp16 operands, fp32 accumulation and output, one rounding into main_grad
            torch.addmm(main_grad, dy_2d.t(), x_2d, out_dtype=main_grad.dtype, out=main_grad)
    elif kernel == "reference":
        accumulate_reference(main_grad, dy_2d, x_2d)
    else:
        raise ValueError(f"unknown dW accumulation kernel {kernel!r}")


def fused_accumulate(
    param: torch.nn.Parameter, x_2d: torch.Tensor, dy_2d: torch.Tensor, kernel: str
) -> None:
    """`param.main_grad += dy_2d^T @ x_2d` in place (`kernel`), then fire param's hooks."""
    _hand_over(param, [fused_into_main_grad(param, x_2d, dy_2d, kernel)])


def fused_into_main_grad(
    param: torch.nn.Parameter, x_2d: torch.Tensor, dy_2d: torch.Tensor, kernel: str
) -> torch.Tensor:
    """`param.main_grad += dy_2d^T @ x_2d` in place (`kernel`); returns the placeholder
    gradient for AccumulateGrad (`added_to_main_grad`)."""
    # main_grad is Megatron DDP's attribute, set on the Parameter at run time (untyped).
    accumulate_into(param.main_grad, dy_2d, x_2d, kernel)  # type: ignore[attr-defined]
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
    `scheduler` (its model's BackwardScheduler) would defer no dW (`defers_dw`: disabled, or no
    all-to-all of the model can take dW beside it, the auto policy over NVLink; see the module
    docstring). Handing an inline dW over through `accumulate_weight_grad` costs one nested
    engine call per parameter, about 10% of a host-bound step (docs/benchmarks/overlap.md)."""
    return not scheduler.defers_dw()


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
    (nothing deferred: `weights_attached`) returned to autograd instead
    (`_attached_linear_grads`)."""

    @staticmethod
    def forward(
        ctx, x, weight_in, bias_in, probe, params, name, accumulation, sched, attached, carry
    ):
        # Computed with the detached weight either way: torch.matmul folds `[s, b, in]` into one
        # mm when the weight requires grad and may take bmm otherwise, so an attached weight
        # would change the bits of y and dX (see `attach`).
        w = weight_in.detach()
        ctx.save_for_backward(x, w)
        # accumulation: (--fluid-wgrad-accumulation mode, gradient_accumulation_fusion)
        ctx.params, ctx.name, ctx.accumulation, ctx.sched = params, name, accumulation, sched
        ctx.attached, ctx.carry = attached, carry
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
            return dx, *_attached_linear_grads(ctx, x, dy, weight, bias, full), *[None] * 7
        if not full:
            return dx, *[None] * 9
        # decided here, not in the task: a refused `fused` raises from this backward
        kernel = accumulation_kernel(weight, dy.device, *ctx.accumulation)

        def dw_task(x=x, dy=dy):
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            if weight.requires_grad:
                if kernel is not None:
                    fused_accumulate(weight, x2, dy2, kernel)
                else:
                    accumulate_weight_grad(weight, torch.matmul(dy2.t(), x2))
            if bias is not None and bias.requires_grad:
                accumulate_weight_grad(bias, dy2.sum(0))

        ctx.sched.defer(dw_task, ctx.name, carry=ctx.carry)
        return dx, *[None] * 9


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
    kernel = accumulation_kernel(weight, dy.device, *ctx.accumulation) if want_w else None

    def dw_task():
        if want_w:
            if kernel is not None:
                grads[0] = fused_into_main_grad(weight, x2, dy2, kernel)
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
    wgrad_accumulation: str = "auto",
    scheduler=None,
    carry: int = 0,
) -> torch.Tensor:
    """`x @ weight^T + bias` whose weight/bias gradients go through the BackwardScheduler, or,
    where that scheduler defers nothing, to autograd as a stock linear's do (`weights_attached`).

    Args:
        x: `[..., in]`; weight: `[out, in]`; bias: `[out]` or None. Returns `[..., out]`.
        name: label for stats and debugging.
        gradient_accumulation_fusion: Megatron's flag (apex's kernel into `main_grad`, if installed).
        wgrad_accumulation: `--fluid-wgrad-accumulation` (auto|fused|unfused; `accumulation_kernel`).
        scheduler: the BackwardScheduler that takes the dW (default `get_backward_scheduler()`).
        carry: all-to-all windows the deferred dW lets pass before it is due
            (BackwardScheduler.defer; FluidMoELayer's shared experts use 1).
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
        (wgrad_accumulation, gradient_accumulation_fusion),
        sched,
        attached,
        carry,
    )
