"""Experts one after another, forward and backward, for large experts whose dW is not deferred.

Shape legend: T dispatched tokens (expert-major), H hidden, F expert FFN size, F1 = 2F with a
gated linear unit else F, G local experts; T_g the rows of expert g.

Why this exists. FluidGroupedMLP's default composition (grouped fc1 -> weighted activation ->
grouped fc2, each an autograd op over all T rows) computes each weight's dW for all local experts
at once, and holds every expert's activation gradient `d_h [T, F1]` at once. Under Megatron DDP
that dW is a transient bf16 tensor the size of the weight (0.94 GiB for the Mixtral-like fc1 at
EP=2) that the DDP hook adds into `main_grad` and drops. Stock SequentialMLP runs each expert's
backward on its own: one expert's dW and `d_h` at a time, and each expert's saved `h`, `a` are
freed as it goes. Large experts also run faster as one cuBLAS GEMM each than in
`torch._grouped_mm` (Mixtral-like fc1 dW at EP=4 on H200: 2.49 vs 2.77 ms; docs/benchmarks/HISTORY.md).

`sequential_experts` is one autograd Function over the whole expert MLP. Forward, per expert g:
    h_g = x_g @ W1[g]^T;  a_g = act(h_g, probs_g);  y[rows of g] = a_g @ W2[g]^T
Backward, per expert g, freeing h_g and a_g after use:
    d_a = dy_g @ W2[g];   dW2[g] = dy_g^T @ a_g
    d_h, d_probs_g = the activation's own backward (autograd through the same `act` call)
    dx[rows of g] = d_h @ W1[g];   dW1[g] = d_h^T @ x_g
Where each dW goes:
  - the parameters have `main_grad` (Megatron DDP): expert g's dW is added into `main_grad[g]` and
    freed at once, as DDP's hook does with each SequentialMLP grad (with an fp32 `main_grad` and
    `--fluid-wgrad-accumulation` auto or fused, inside the GEMM: `accumulate_into`, no dW tensor;
    fluid.schedule.wgrad.accumulation_kernel); at the end the parameters get
    `grad_added_to_main_grad` and a placeholder gradient (`mark_added_to_main_grad`), Megatron's
    own convention for dW accumulated in place;
  - otherwise into one stacked dW per weight, handed to autograd at the end. That buffer exists
    for the whole backward, allocated while every expert's activations are still alive, so the
    peak is higher than the composition's (Mixtral-like layer, 2x H200, no main_grad: 4.32 vs
    3.44 GB; docs/benchmarks/HISTORY.md). FluidGroupedMLP therefore takes this path only under DDP.
"Handed to autograd": through the scheduler (`accumulate_weight_grad`), or, with the scheduler off,
returned from backward as the weights' gradients (fluid.schedule.wgrad, weights attached), which
also answers `autograd.grad(out, [weight1])` and `backward(inputs=[weight1])` with the stacked dW.
FluidGroupedMLP also takes it only when the scheduler would run dW inline anyway
(`BackwardScheduler.defers_dw()` is False: scheduler off, or no all-to-all can take dW beside it,
e.g. over NVLink): deferring dW would need every expert's `d_h` kept until the window.

Numerics: every GEMM is the call the per-expert loop of `fluid.moe.grouped_gemm` makes on the same
rows (`x_g @ W[g]^T`, `dy_g @ W[g]`, `dy_g^T @ x_g`), and the activation is elementwise (its
probs gradient a per-row sum), so the result is bit-identical to the composition with the loop
GEMMs, `main_grad` included (an elementwise add, per expert or for all at once; with fused
accumulation the same per-expert accumulate call as the composition's): scheduler on vs
off stays bit-identical (tests/cpu/test_expert_loop.py, tests/gpu/moe_parity_script.py).

The per-expert `h_g`, `a_g` and the activation's graph live on `ctx` (not `save_for_backward`), so
saved-tensor hooks (activation offloading) do not see them; FluidMoE does not support those.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fluid.schedule import get_backward_scheduler
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


def has_main_grad(params) -> bool:
    """True under Megatron DDP: every trainable one of `params` has its `main_grad` (and there is
    at least one), so this path adds dW into `main_grad` itself."""
    trainable = [p for p in params if p.requires_grad]
    return bool(trainable) and all(hasattr(p, "main_grad") for p in trainable)


class _SequentialExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, w1, w2, probe, counts, params, act, name, sched, attached, mode):
        # attached (nothing deferred): w1, w2 are views; computed with detached (wgrad.attach)
        w1, w2 = w1.detach(), w2.detach()
        num_rows, hidden = x.shape
        out = x.new_empty((num_rows, hidden))
        saved = []  # per expert: (h_g leaf, probs_g leaf, a_g with its activation graph)
        start = 0
        for g, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:
                saved.append(None)
                continue
            h_g = torch.matmul(x[rows], w1[g].t())
            with torch.enable_grad():
                h_leaf = h_g.requires_grad_()
                p_leaf = probs[rows].detach().requires_grad_(probs.requires_grad)
                a_g = act(h_leaf, p_leaf)
            torch.matmul(a_g.detach(), w2[g].t(), out=out[rows])
            saved.append((h_leaf, p_leaf, a_g))
        ctx.save_for_backward(x, w1, w2)
        ctx.probe_index = None if probe is None else 4  # tensor inputs: x, probs, w1, w2, probe
        ctx.saved_experts, ctx.counts, ctx.params, ctx.name = saved, counts, params, name
        ctx.sched, ctx.attached, ctx.mode = sched, attached, mode
        ctx.probs_meta = (probs.shape, probs.dtype, probs.requires_grad)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2 = ctx.saved_tensors
        saved, counts, (param1, param2) = ctx.saved_experts, ctx.counts, ctx.params
        ctx.saved_experts = ctx.params = None
        dy = dy.contiguous()
        want_dx = ctx.needs_input_grad[0]
        probs_shape, probs_dtype, want_dprobs = ctx.probs_meta
        dx = x.new_empty(x.shape) if want_dx else None
        # every row belongs to one expert with rows, whose loop step writes it: no zero fill
        dprobs = dy.new_empty(probs_shape, dtype=probs_dtype) if want_dprobs else None
        # In a training backward under Megatron DDP (params with main_grad) each expert's dW is
        # added into main_grad[g] and freed, as DDP's hook does with each of SequentialMLP's
        # per-expert grads; otherwise it is written into one stacked dW per weight, handed to
        # autograd at the end. Under autograd.grad / backward(inputs=...) no dW at all
        # (fluid.schedule.wgrad.dw_wanted), except, with the weights attached (nothing deferred),
        # the plain stacked dW of each weight asked for (input_grad_wanted).
        full = dw_wanted(ctx, ctx.probe_index, "sequential_experts")
        if ctx.attached:  # tensor inputs: x, probs, w1, w2, probe
            want1, want2 = input_grad_wanted(ctx, 2), input_grad_wanted(ctx, 3)
        else:
            want1, want2 = full and param1.requires_grad, full and param2.requires_grad
        direct = full and has_main_grad((param1, param2))
        dw1 = w1.new_empty(w1.shape) if want1 and not direct else None
        dw2 = w2.new_empty(w2.shape) if want2 and not direct else None
        # fused accumulation into main_grad[g] (None: dW then an add), per parameter
        kernels = {
            id(p): accumulation_kernel(p, dy.device, ctx.mode) if direct else None
            for p in (param1, param2)
        }

        def expert_dw(param, stacked, g, dy_g, inp):
            """Expert g's dW = dy_g^T @ inp: into the stacked dW, or added into main_grad[g]."""
            if stacked is not None:
                torch.matmul(dy_g.t(), inp, out=stacked[g])
            elif direct and param.requires_grad:
                if (kernel := kernels[id(param)]) is not None:
                    accumulate_into(param.main_grad[g], dy_g, inp, kernel)
                else:
                    param.main_grad[g].add_(torch.matmul(dy_g.t(), inp))

        start = 0
        for g, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            if count == 0:  # SequentialMLP gives an expert without rows an all-zero dW
                for dw in (dw1, dw2):
                    if dw is not None:
                        dw[g].zero_()
                continue
            h_leaf, p_leaf, a_g = saved[g]
            saved[g] = None  # h_g, a_g go once this expert is done, as in SequentialMLP
            dy_g = dy[rows]
            d_a = torch.matmul(dy_g, w2[g])
            expert_dw(param2, dw2, g, dy_g, a_g.detach())
            inputs = (h_leaf, p_leaf) if want_dprobs else (h_leaf,)
            grads = torch.autograd.grad(a_g, inputs, d_a)
            del a_g, d_a
            d_h = grads[0]
            if want_dprobs:
                dprobs[rows] = grads[1]
            if dx is not None:
                torch.matmul(d_h, w1[g], out=dx[rows])
            expert_dw(param1, dw1, g, d_h, x[rows])
            del d_h, h_leaf, p_leaf, grads
        none = [None] * 8  # probe, counts, params, act, name, sched, attached, mode
        if not (want1 or want2):
            return dx, dprobs, None, None, *none

        # dW is complete; the scheduler runs this inline (this path is only taken when it would
        # not defer). Each stacked dW sits only in its box, so AccumulateGrad adopts it (no copy).
        boxes = [(param1, [dw1]), (param2, [dw2])]
        del dw1, dw2
        if ctx.attached:
            if not full:  # weights asked for directly: their plain dW
                return dx, dprobs, boxes[0][1].pop(), boxes[1][1].pop(), *none
            settled: list = []  # a training backward: one inline scheduler task, as deferred

            def settle():
                for param, box in boxes:
                    if box[0] is not None:
                        settled.append(engine_weight_grad(param, box.pop()))
                    else:  # added into main_grad above, or no gradient
                        settled.append(added_to_main_grad(param) if param.requires_grad else None)

            ctx.sched.run_inline(settle, ctx.name)
            return dx, dprobs, settled.pop(0), settled.pop(0), *none

        def hand_over():
            for param, box in boxes:
                if box[0] is not None:
                    accumulate_boxed_weight_grad(param, box)
                elif direct and param.requires_grad:
                    mark_added_to_main_grad(param)

        ctx.sched.defer(hand_over, ctx.name)
        return dx, dprobs, None, None, *none


def sequential_experts(
    x_TH: torch.Tensor,
    probs_T: torch.Tensor,
    weight1_GF1H: torch.nn.Parameter,
    weight2_GHF: torch.nn.Parameter,
    counts: Sequence[int],
    act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    name: str = "",
    scheduler=None,
    wgrad_accumulation: str = "auto",
) -> torch.Tensor:
    """`[T, H]` -> `[T, H]`: every local expert's MLP on its rows (see the module docstring);
    the dW hand-over goes through `scheduler` (the model's; default `get_backward_scheduler()`),
    or, where that scheduler defers nothing, to autograd (fluid.schedule.wgrad.weights_attached).

    Args:
        x_TH: rows of expert g contiguous, g ascending; counts: G host ints summing to T.
        probs_T: routing probability per row (fp32 or the activation dtype).
        act: `(h [T_g, F1], probs [T_g]) -> a [T_g, F]`, differentiable in both.
        wgrad_accumulation: `--fluid-wgrad-accumulation` (auto|fused|unfused), how dW reaches an
            fp32 `main_grad` (fluid.schedule.wgrad.accumulation_kernel).
    """
    sched = get_backward_scheduler() if scheduler is None else scheduler
    attached = weights_attached(sched)  # scheduler off: dW returned to autograd
    # The probe (fluid.schedule.wgrad.dw_probe) tells backward whether dW is wanted, and keeps
    # the op in the graph when x needs no gradient, so dW still runs then.
    return _SequentialExperts.apply(
        x_TH,
        probs_T,
        attach(weight1_GF1H, attached),
        attach(weight2_GHF, attached),
        dw_probe(weight1_GF1H, weight2_GHF),
        tuple(int(c) for c in counts),
        (weight1_GF1H, weight2_GHF),
        act,
        name,
        sched,
        attached,
        wgrad_accumulation,
    )
