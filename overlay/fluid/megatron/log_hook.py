"""Training-log hook (patch 0003): the scheduler's stats in the training log, rank 0 only.

Installed under the entry-point group `megatron.training.log_hooks`; Megatron's `training_log`
calls it at every --log-interval after printing the iteration line. It prints one line with the
counters since the previous log (and timings with --fluid-scheduler-timing), then resets them.
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
    ]
    parts = [f"{label} {stats.get(k, 0)}" for label, k in keys]
    if stats.get("a2a_ms") is not None:
        parts.append(f"a2a {stats['a2a_ms']:.2f} ms")
        parts.append(f"dW in window {stats.get('dw_in_window_ms', 0.0):.2f} ms")
        eff = stats.get("overlap_efficiency")
        parts.append("overlap eff " + ("n/a" if eff is None else f"{eff:.2f}"))
    return "[FluidMoE scheduler] " + " | ".join(parts)


def log_scheduler_stats(iteration: int, args) -> None:
    if not getattr(args, "use_fluid_moe", False):
        return
    import torch.distributed as dist

    from fluid.schedule import get_backward_scheduler

    sched = get_backward_scheduler()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"iteration {iteration:8d} " + format_stats(sched.get_stats()), flush=True)
    sched.reset_stats()
