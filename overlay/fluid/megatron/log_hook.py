"""Training-log hook (patch 0003): the scheduler's stats in the training log, rank 0 only.

Installed under the entry-point group `megatron.training.log_hooks`; Megatron's `training_log`
calls it at every --log-interval after printing the iteration line. It prints one line with the
counters since the previous log (summed over the schedulers of every model chunk built from its
own config; timings with --fluid-scheduler-timing), then resets them.
"""

from __future__ import annotations

import statistics


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
        parts.append(f"exposed {stats.get('exposed_a2a_ms', 0.0):.2f} ms")
        hf = stats.get("hidden_fraction")
        parts.append("hidden " + ("n/a" if hf is None else f"{hf:.2f}"))
    trial = stats.get("overlap_trial")  # --fluid-overlap measure
    if trial is not None:
        on, off = trial["on_ms"], trial["off_ms"]
        if trial["decision"] is None:
            parts.append(f"overlap measuring ({len(on)} on / {len(off)} off timed)")
        else:
            med = statistics.median(on), statistics.median(off)
            parts.append(
                f"overlap measured {'on' if trial['decision'] else 'off'} "
                f"({med[0]:.1f} / {med[1]:.1f} ms per micro-batch on / off)"
            )
    return "[FluidMoE scheduler] " + " | ".join(parts)


def combined_stats(stats: list[dict]) -> dict:
    """The stats of several schedulers (one per model chunk built from its own config) as one:
    counters and times summed, hidden_fraction recomputed from the summed times."""
    if len(stats) == 1:
        return stats[0]
    out: dict = {}
    for s in stats:
        for k, v in s.items():
            if k == "hidden_fraction":
                continue
            if isinstance(v, (bool, dict)) or v is None:  # a dict: the first chunk's trial
                out.setdefault(k, v)
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    if out.get("a2a_ms") is not None:
        a2a = out["a2a_ms"]
        out["hidden_fraction"] = (1.0 - out.get("exposed_a2a_ms", 0.0) / a2a) if a2a > 0 else None
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
