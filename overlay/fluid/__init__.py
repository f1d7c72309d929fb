"""FluidMoE: Megatron-LM layers that hide all-to-all communication behind computation.

Public API (the layer classes import Megatron lazily, so `import fluid` is cheap and works
without a GPU):

    from fluid import (get_fluid_moe_layer_spec, FluidSelfAttention, FluidMoELayer,
                       get_backward_scheduler, print_fluid_layer_info, print_status)
"""

from fluid.schedule import get_backward_scheduler
from fluid.status import print_status, status

__version__ = "0.1.0"

_LAZY = {
    "FluidSelfAttention": "fluid.attention",
    "FluidMoELayer": "fluid.moe",
    "get_fluid_moe_layer_spec": "fluid.megatron.specs",
    "print_fluid_layer_info": "fluid.megatron.info",
    # Names FluidMoE v0.5 exported that exist today (docs/MIGRATION.md).
    "BackwardScheduler": "fluid.schedule",
    "fluid_all_to_all_sp2hp": "fluid.comm",
    "fluid_all_to_all_hp2sp": "fluid.comm",
    "FluidColumnParallelLinear": "fluid.linear",
    "FluidRowParallelLinear": "fluid.linear",
    "FluidGroupedMLP": "fluid.moe",
    "FluidTokenDispatcher": "fluid.moe",
}

__all__ = [
    "get_fluid_moe_layer_spec",
    "FluidSelfAttention",
    "FluidMoELayer",
    "get_backward_scheduler",
    "print_fluid_layer_info",
    "print_status",
    "status",
    "BackwardScheduler",
    "fluid_all_to_all_sp2hp",
    "fluid_all_to_all_hp2sp",
    "FluidColumnParallelLinear",
    "FluidRowParallelLinear",
    "FluidGroupedMLP",
    "FluidTokenDispatcher",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fluid' has no attribute {name!r}")
