"""Training-log hook (patch 0003): the scheduler's stats in the training log, rank 0 only.

Installed under the entry-point group `megatron.training.log_hooks`; Megatron's `training_log`
calls it at every --log-interval after printing the iteration line. It prints one line with the
counters since the previous log (summed over the schedulers of every model chunk built from its
own config; timings with --fluid-scheduler-timing), then resets them.
"""

from __future__ import annotations


def format_stats(stats: dict) -> str:
    keys = [
        ("dW tasks", "total_dw_tasks"),
        ("overlapped", "overlapped_dw_tasks"),
        ("after-wait", "after_wait_dw_tasks"),
        ("flushed", "flushed_dw_tasks"),
        ("inline", "inline_dw_tasks"),
        ("a2a", "a2a_calls"),
        ("skipped windows", "skipped_windows"),
        ("stale", "dropped_stale_tasks"),
        ("failed", "failed_dw_tasks"),
        ("discarded", "discarded_dw_tasks"),
    ]
    parts = [f"{label} {stats.get(k, 0)}" for label, k in keys]
    if stats.get("a2a_ms") is not None:
        parts.append(f"a2a {stats['a2a_ms']:.2f} ms")
        parts.append(f"dW in window {stats.get('dw_in_window_ms', 0.0):.2f} ms")
        eff = stats.get("overlap_efficiency")
        parts.append("overlap eff " + ("n/a" if eff is None else f"{eff:.2f}"))
    return "[FluidMoE scheduler] " + " | ".join(parts)


def combined_stats(stats: list[dict]) -> dict:
    """The stats of several schedulers (one per model chunk built from its own config) as one:
    counters and times summed; overlap_efficiency only where a single scheduler has it."""
    if len(stats) == 1:
        return stats[0]
    out: dict = {}
    for s in stats:
        for k, v in s.items():
            if k == "overlap_efficiency":
                continue
            if isinstance(v, bool) or v is None:
                out.setdefault(k, v)
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    effs = [s["overlap_efficiency"] for s in stats if s.get("overlap_efficiency") is not None]
    if any("a2a_ms" in s for s in stats):
        out["overlap_efficiency"] = effs[0] if len(effs) == 1 else None
    return out


def log_scheduler_stats(iteration: int, args) -> None:
    if not getattr(args, "use_fluid_moe", False):
        return
    import torch.distributed as dist

    from fluid.runtime import live_runtimes
    from fluid.schedule import get_backward_scheduler

    scheds = [rt.scheduler for rt in live_runtimes()] or [get_backward_scheduler()]
    stats = combined_stats([s.get_stats() for s in scheds])
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"iteration {iteration:8d} " + format_stats(stats), flush=True)
    for s in scheds:
        s.reset_stats()
