"""`print_fluid_layer_info(model)`: which modules of a model are Fluid, by qualified name, and the
state of the BackwardScheduler they hand their weight gradients to."""

from __future__ import annotations


def fluid_layer_info(model) -> list[tuple[str, str]]:
    """(qualified name, class name) of every Fluid module in `model` (DDP/Float16 wrappers and
    lists of model chunks are unwrapped)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    rows = []
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        for name, mod in chunk.named_modules():
            cls = type(mod)
            if cls.__module__.startswith("fluid."):
                rows.append((prefix + name, cls.__name__))
    return rows


def model_scheduler(model):
    """The BackwardScheduler of `model`: the one a module of it holds (any attribute that is a
    BackwardScheduler), else the process's (`get_backward_scheduler()`)."""
    from fluid.schedule import BackwardScheduler, get_backward_scheduler

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for mod in chunk.modules():
            for value in vars(mod).values():
                if isinstance(value, BackwardScheduler):
                    return value
    return get_backward_scheduler()


def scheduler_state(sched) -> str:
    """One line: on/off, whether a dW handed over in backward would be deferred, timing, queue."""
    if not sched.enabled:
        mode = "disabled (every dW inline, as stock Megatron)"
    elif sched.defers_dw():
        mode = "enabled (dW deferred into backward all-to-all windows)"
    else:
        mode = "enabled, dW inline (no all-to-all group overlaps compute, e.g. one NVLink node)"
    timing = "on" if sched.timing else "off"
    return f"scheduler: {mode}; timing {timing}; {sched.num_pending} dW task(s) pending"


def print_fluid_layer_info(model, rank0_only: bool = True) -> list[tuple[str, str]]:
    """Print and return fluid_layer_info(model); counts per class, then the scheduler's state
    (`scheduler_state`) on the last line."""
    import torch.distributed as dist

    rows = fluid_layer_info(model)
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return rows
    width = max((len(n) for n, _ in rows), default=10)
    print(f"FluidMoE layers ({len(rows)} modules):")
    for name, cls in rows:
        print(f"  {name:<{width}}  {cls}")
    counts: dict[str, int] = {}
    for _, cls in rows:
        counts[cls] = counts.get(cls, 0) + 1
    print("  " + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())) if counts else "  none")
    print("  " + scheduler_state(model_scheduler(model)))
    return rows
