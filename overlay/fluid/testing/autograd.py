"""Test-only: an identity op whose backward runs a callback, to drive the BackwardScheduler from
inside a real autograd backward pass (it queues dW only there: `_graph_task_id() != -1`), and
`PolicyComm`, the part of a CommContext the scheduler reads."""

from __future__ import annotations

import contextlib
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


class PolicyComm:
    """A CommContext stand-in for scheduler tests: its overlap policy (`should_overlap`), its
    window threshold, and no SM carve-out beside the communication. Register it with
    `BackwardScheduler.register_comm` to gate deferral (held weakly there: keep a reference)."""

    min_window_bytes = 1024

    def __init__(self, overlap: bool = True):
        self.overlap = overlap

    def should_overlap(self) -> bool:
        return self.overlap

    def beside_comm(self):
        return contextlib.nullcontext()
