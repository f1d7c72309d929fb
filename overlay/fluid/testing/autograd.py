"""Test-only: an identity op whose backward runs a callback, to drive the BackwardScheduler from
inside a real autograd backward pass (it queues dW only there: `_graph_task_id() != -1`)."""

from __future__ import annotations

from typing import Callable

import torch


def backward_op(on_backward: Callable[[], None]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> x.clone()`; its backward calls `on_backward()`, then passes the gradient on."""

    class _CallbackOnBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            on_backward()
            return g

    return _CallbackOnBackward.apply
