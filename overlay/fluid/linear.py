"""Megatron's ColumnParallelLinear / RowParallelLinear with dW deferred to the BackwardScheduler.

`FluidColumnParallelLinear` and `FluidRowParallelLinear` are drop-in subclasses: same constructor
(Megatron core_v0.19, including `name=` and `tp_group=`), same parameters (`weight` `[out, in]`,
optional `bias` `[out]`), same state-dict keys and sharded checkpoint layout, same `(output, bias)`
return with `skip_bias_add` semantics. Only the backward differs: dX is computed at once (the op
below needs it), dW and db go to `fluid.schedule.deferred_linear`, which queues them for the next
all-to-all window. With the scheduler off (`--no-fluid-scheduler`) the weights are autograd inputs
and dW is returned to autograd as stock's is (bit-identical to the deferred values), so
`torch.autograd.grad(out, [layer.weight])` and `backward(inputs=[layer.weight])` work as for the
stock layer; with it on, they do not (fluid/schedule/wgrad.py says why).

Tensor parallelism: FluidMoE parallelises attention over context-parallel ranks (Ulysses) and the
MoE over expert-parallel ranks; it does not implement the TP collectives (input copy, all-reduce,
sequence-parallel all-gather / reduce-scatter) around a deferred dW. A TP group of size > 1 is
refused at build time with a ValueError rather than computed wrong.

`gradient_accumulation_fusion`: honoured through `deferred_linear` (apex's fused kernel writes
into DDP's `main_grad` when apex is installed; otherwise `--fluid-wgrad-accumulation` decides:
`auto`, the default, torch's fused addmm into an fp32 `main_grad`;
fluid.schedule.wgrad.accumulation_kernel).
Stock ColumnParallelLinear raises at build time when the flag is on and apex is missing; the Fluid
classes do not.

`backward_dw()` is a no-op, as in stock Megatron's local linears: Fluid dW never waits for an
explicit call, it runs in the scheduler's windows or at the end of the backward pass.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size

from fluid.runtime import runtime_for
from fluid.schedule import deferred_linear


class _DeferredDW:
    """What both Fluid linears add to Megatron's: the model's scheduler and settings, and the
    matmul whose dW goes through them. Mixed in before the Megatron class."""

    # set by the Megatron linear this is mixed into
    tp_group: Any
    skip_bias_add: bool
    bias: Optional[torch.nn.Parameter]
    gradient_accumulation_fusion: bool

    def _init_fluid(self, config, name: Optional[str], default_name: str) -> None:
        """After the Megatron linear's __init__: refuses TP > 1, takes the model's runtime."""
        from fluid.megatron.validate import check_tensor_parallel_size

        check_tensor_parallel_size(get_pg_size(self.tp_group), type(self).__name__)
        runtime = runtime_for(config)  # the model's (fluid.runtime)
        self.fluid_name = name or default_name
        self.fluid_scheduler = runtime.scheduler
        self.fluid_wgrad_accumulation = runtime.config.wgrad_accumulation
        # all-to-all windows its deferred dW lets pass (BackwardScheduler.defer); 1 for the
        # shared experts' linears (FluidMoELayer), else 0
        self.fluid_dw_carry = 0

    def _deferred_forward(
        self, input_: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`(input_ @ weight^T (+ bias), bias or None)`, Megatron's skip_bias_add convention."""
        bias = None if self.skip_bias_add else self.bias
        output = deferred_linear(
            input_,
            weight,
            bias,
            name=self.fluid_name,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            wgrad_accumulation=self.fluid_wgrad_accumulation,
            scheduler=self.fluid_scheduler,
            carry=self.fluid_dw_carry,
        )
        return output, (self.bias if self.skip_bias_add else None)


class FluidColumnParallelLinear(_DeferredDW, ColumnParallelLinear):
    """`Y = X W^T + b` with `W` `[out, in]`; dW/db deferred (see module docstring).

    Args: exactly `ColumnParallelLinear`'s (Megatron core_v0.19). `name` labels the dW tasks in
    the scheduler's stats.
    """

    def __init__(
        self, input_size: int, output_size: int, *, config, name: str | None = None, **kwargs
    ):
        build_config = config
        if config.gradient_accumulation_fusion:
            # Stock raises without apex; the Fluid dW path falls back exactly (see module doc).
            build_config = copy.copy(config)
            build_config.gradient_accumulation_fusion = False
        super().__init__(input_size, output_size, config=build_config, name=name, **kwargs)
        self.config = config
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        self._init_fluid(config, name, "column_parallel_linear")

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`input_` `[s, b, in]` -> `(output [s, b, out], bias or None)`.

        `weight` (for `skip_weight_param_allocation`, e.g. a tied output layer) must be
        `[out, in]`. `runtime_gather_output` is accepted and is a no-op at TP=1.
        """
        if self.config.defer_embedding_wgrad_compute:
            # Megatron's own output-layer wgrad deferral (pipeline parallel): keep its path.
            return super().forward(input_, weight, runtime_gather_output)
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "weight was not supplied to FluidColumnParallelLinear forward pass "
                    "and skip_weight_param_allocation is True."
                )
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            raise RuntimeError(
                f"supplied weight's shape is {tuple(weight.shape)}, "
                f"not {(self.output_size_per_partition, self.input_size)} as expected"
            )
        return self._deferred_forward(input_, weight)

    # Overridden in each class, not in the mixin: tools/api_check.py watches upstream methods that
    # an overlay class overrides directly.
    def backward_dw(self) -> None:
        """No-op: the dW of this layer runs in the BackwardScheduler's windows."""


class FluidRowParallelLinear(_DeferredDW, RowParallelLinear):
    """`Y = X W^T + b` with `W` `[out, in]`; dW/db deferred (see module docstring).

    Args: exactly `RowParallelLinear`'s (Megatron core_v0.19).
    """

    def __init__(
        self, input_size: int, output_size: int, *, config, name: str | None = None, **kwargs
    ):
        super().__init__(input_size, output_size, config=config, name=name, **kwargs)
        self._init_fluid(config, name, "row_parallel_linear")

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """`input_` `[s, b, in]` -> `(output [s, b, out], bias or None)`."""
        return self._deferred_forward(input_, self.weight)

    def backward_dw(self) -> None:
        """No-op: the dW of this layer runs in the BackwardScheduler's windows."""
