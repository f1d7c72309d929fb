"""FluidRuntime: what the Fluid layers of one model share.

A model's runtime holds its resolved settings (FluidConfig), its BackwardScheduler, and one
CommContext per process group (the EP group of every MoE layer, the CP group of every attention
layer: one communication stream per group, not per layer). The first Fluid layer built from a
TransformerConfig creates it; every later layer built from the same config object gets the same
one (`runtime_for(config)`); Megatron hands one config object to every layer of a model. Two models
built from different config objects have separate runtimes, so one model's settings and
communication groups never change another's dW deferral (`BackwardScheduler.defers_dw` looks at
its own runtime's contexts only).

The runtime is kept on the config (attribute `_fluid_runtime`, not a dataclass field, so it is no
flag and not in the argument dump). Megatron deep-copies configs in places (shared experts,
attention with few query groups): a copy keeps the same runtime. A config whose fluid_* fields
were changed after a layer was built gets a new runtime for the layers built after the change.

`get_backward_scheduler()` (fluid.schedule) returns the scheduler of the most recently created
runtime that is still alive: with one model per process, that model's.

Code that runs without a model (the v0.5 group-form all-to-alls called outside one, see
fluid.comm.ulysses) has `standalone_runtime()`: default settings and `default_scheduler()`, the
scheduler such code already shares. It is not a model's, so `latest_runtime()` never returns it.
"""

from __future__ import annotations

import weakref
from typing import Optional

from fluid.config import FluidConfig

_ATTR = "_fluid_runtime"


class FluidRuntime:
    """Scheduler and communication contexts of one model (see the module docstring).

    Args:
        fluid_config: the model's resolved settings.
        scheduler: the BackwardScheduler to use; None (a model's runtime): a new one built from
            `fluid_config`.
    """

    def __init__(self, fluid_config: FluidConfig, scheduler=None):
        from fluid.schedule.scheduler import BackwardScheduler

        self.config = fluid_config
        if scheduler is None:
            scheduler = BackwardScheduler(
                enabled=fluid_config.scheduler, timing=fluid_config.scheduler_timing
            )
        self.scheduler = scheduler
        self._comms: dict = {}  # process group -> CommContext

    def comm(self, group, expert_parallel: bool = False):
        """The CommContext of `group` (created on first use with this runtime's settings; its
        all-to-alls' backward windows are filled by this runtime's scheduler).
        `expert_parallel`: the caller is an MoE layer, whose group's context, when this call
        creates it, takes `--fluid-emulate-link-gbps` (fluid.comm.emulated_link)."""
        from fluid.comm.context import CommContext

        ctx = self._comms.get(group)
        if ctx is None:
            ctx = CommContext.from_fluid_config(
                group, self.config, scheduler=self.scheduler, emulate_link=expert_parallel
            )
            self._comms[group] = ctx
        return ctx

    @property
    def comms(self) -> list:
        return list(self._comms.values())

    # A deep copy of the config (Megatron makes some) shares the runtime; a pickled config
    # (nothing in Megatron pickles one today) comes back without it.
    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        return (_no_runtime, ())

    def __repr__(self) -> str:
        return f"FluidRuntime({self.config}, comm groups={len(self._comms)})"


def _no_runtime():
    return None


_LIVE: "weakref.WeakSet[FluidRuntime]" = weakref.WeakSet()
_LATEST: Optional["weakref.ref[FluidRuntime]"] = None
_STANDALONE: Optional[FluidRuntime] = None


def runtime_for(config) -> FluidRuntime:
    """The runtime of the model `config` belongs to (created on first use; see module doc)."""
    global _LATEST
    fluid_config = FluidConfig.from_config(config)
    rt = getattr(config, _ATTR, None)
    if rt is not None and rt.config == fluid_config:
        return rt
    rt = FluidRuntime(fluid_config)
    setattr(config, _ATTR, rt)
    _LIVE.add(rt)
    _LATEST = weakref.ref(rt)
    return rt


def latest_runtime() -> Optional[FluidRuntime]:
    """The most recently created runtime that is still alive (None before any model)."""
    rt = _LATEST() if _LATEST is not None else None
    if rt is None and len(_LIVE):
        rt = next(iter(_LIVE))
    return rt


def live_runtimes() -> list[FluidRuntime]:
    """Every runtime still alive (one per model, or per model chunk built from its own config)."""
    return list(_LIVE)


def standalone_runtime() -> FluidRuntime:
    """The runtime of code without a model (see the module docstring): default FluidConfig,
    `default_scheduler()`, created on first use and kept for the process, as that scheduler is."""
    global _STANDALONE
    if _STANDALONE is None:
        from fluid.schedule.scheduler import default_scheduler

        _STANDALONE = FluidRuntime(FluidConfig(), scheduler=default_scheduler())
    return _STANDALONE
