"""The backward scheduler and the deferred-dW primitives built on it."""

from fluid.schedule.scheduler import BackwardScheduler, get_backward_scheduler
from fluid.schedule.wgrad import accumulate_weight_grad, deferred_linear

__all__ = [
    "BackwardScheduler",
    "get_backward_scheduler",
    "accumulate_weight_grad",
    "deferred_linear",
]
