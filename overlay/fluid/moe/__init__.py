"""Expert-parallel MoE: FluidMoELayer, its all-to-all dispatcher and grouped experts.

Importing this package imports Megatron (fluid's top-level package loads it lazily).
"""

from fluid.moe.dispatcher import FluidTokenDispatcher
from fluid.moe.experts import FluidGroupedMLP
from fluid.moe.layer import FluidMoELayer
from fluid.moe.router import FluidTopKRouter

__all__ = ["FluidMoELayer", "FluidTokenDispatcher", "FluidGroupedMLP", "FluidTopKRouter"]
