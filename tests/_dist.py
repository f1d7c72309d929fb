"""Spawn CPU worker processes on gloo for the multi-process tier (tests/dist).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, each initialises a gloo
default group on a free loopback port and calls `fn(rank, world_size, *args)`; `fn` must be a
module-level function (it is pickled). Any worker's exception fails the caller with the worker's
traceback; a worker that hangs past `timeout` seconds is killed and fails the caller, so a
deadlocked collective never hangs CI.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    # A worker that dies on a signal (SIGABRT from C++ std::terminate, SIGSEGV) prints every
    # thread's Python stack to stderr, which pytest shows: where it died, not only that it did.
    faulthandler.enable(all_threads=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> None:
    ctx = mp.start_processes(
        _worker,
        args=(world_size, _free_port(), fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: workers did not finish in {timeout:.0f}s")
