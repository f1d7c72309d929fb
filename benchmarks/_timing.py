"""Timing shared by the benchmarks (run on GPU hosts; CPU dry runs use the wall clock)."""

import statistics
import time

import torch
import torch.distributed as dist


class Timer:
    """Median ms of `fn` over `iters` after `warmup` (CUDA events, or wall clock on CPU); with
    `barrier` all ranks start each timed iteration together."""

    def __init__(self, cuda: bool, barrier: bool = True):
        self.cuda, self.barrier = cuda, barrier

    def __call__(self, fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.barrier:
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
        return statistics.median(times)
