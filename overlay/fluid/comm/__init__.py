"""All-to-all primitives: CommContext (group + stream), async handles, Ulysses layout changes."""

from fluid.comm.all_to_all import fluid_all_to_all
from fluid.comm.context import CommContext, CommHandle
from fluid.comm.ulysses import fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp

__all__ = [
    "CommContext",
    "CommHandle",
    "fluid_all_to_all",
    "fluid_all_to_all_sp2hp",
    "fluid_all_to_all_hp2sp",
]
