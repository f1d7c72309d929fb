"""`print_fluid_layer_info(model)`: which modules of a model are Fluid, by qualified name."""

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


def print_fluid_layer_info(model, rank0_only: bool = True) -> list[tuple[str, str]]:
    """Print and return fluid_layer_info(model); counts per class on the last line."""
    import torch.distributed as dist

    rows = fluid_layer_info(model)
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return rows
    width = max((len(n) for n, _ in rows), default=10)
    print(f"FluidMoE layers ({len(rows)} modules):")
    for name, cls in rows:
        print(f"  {name:<{width}}  {cls}")
    counts = {}
    for _, cls in rows:
        counts[cls] = counts.get(cls, 0) + 1
    print("  " + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())) if counts else "  none")
    return rows
