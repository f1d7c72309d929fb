"""Timing for the benchmarks: CUDA events on GPU, the wall clock on CPU (dry runs)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


class Timer:
    """Median ms of `fn` over `iters` after `warmup`; with `barrier` (and an initialized process
    group) all ranks start each timed iteration together."""

    def __init__(self, cuda: bool, barrier: bool = True):
        self.cuda, self.barrier = cuda, barrier

    def samples(self, fn, warmup: int, iters: int) -> list:
        """Every timed iteration's ms."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.barrier and dist.is_initialized():
                dist.barrier()
            if self.cuda:
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return times

    def __call__(self, fn, warmup: int, iters: int) -> float:
        return statistics.median(self.samples(fn, warmup, iters))


def alternating_rounds(steps: dict, order, rounds: int, warmup: int, iters: int, timer) -> list:
    """`rounds` rounds; in each, every name of `order` (a key of `steps`, a zero-argument step)
    is timed in turn: `warmup` untimed calls, then the median of `iters`. Host or clock drift
    then hits every variant of a round alike. Returns one {name: ms} per round."""
    out = []
    for _ in range(rounds):
        out.append({name: timer(steps[name], warmup, iters) for name in order})
    return out


def spread(values) -> dict:
    """median, min, max of a list of numbers (None for an empty list)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(v), "min": v[0], "max": v[-1]}


def round_ratios(rounds: list, num: str, den: str) -> dict:
    """Per-round ratio rounds[num] / rounds[den] (> 1: `den` is faster) with its spread."""
    vals = [r[num] / r[den] for r in rounds if r.get(num) and r.get(den)]
    return {**spread(vals), "rounds": vals}
