"""Start CPU worker processes on gloo for the multi-process tier (tests/dist).

`run_distributed(fn, world_size, *args)` starts `world_size` processes, each initialises a gloo
default group on a free loopback port and calls `fn(rank, world_size, *args)`; `fn` must be a
module-level function (it is pickled). Any worker's exception fails the caller with the worker's
traceback; a worker that hangs past `timeout` seconds is killed and fails the caller, so a
deadlocked collective never hangs CI.

Workers are forked from a forkserver that imported torch, Megatron core and fluid once
(tests/_dist_preload.py), not spawned fresh: each spawned worker spent about 6 s of CPU importing
them, most of the dist tier's time on a 2-core CI machine. Each worker gets the caller's
environment as of the call (as a spawned one would), one OpenMP thread, and Megatron's fused
activations run eagerly (see tests/conftest.py, `eager_megatron_fusions`).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
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


_START_METHOD = "forkserver"
multiprocessing.get_context(_START_METHOD).set_forkserver_preload(["tests._dist_preload"])


def _worker(rank, world_size, port, fn, args, environ):
    # A worker that dies on a signal (SIGABRT from C++ std::terminate, SIGSEGV) prints every
    # thread's Python stack to stderr, which pytest shows: where it died, not only that it did.
    faulthandler.enable(all_threads=True)
    os.environ.clear()  # the forkserver's environment dates from its start: use the caller's
    os.environ.update(environ)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from torch._dynamo import config as dynamo_config

    dynamo_config.disable = True  # Megatron's torch.compile'd fusions run eagerly (conftest.py)
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
        args=(world_size, _free_port(), fn, args, dict(os.environ)),
        nprocs=world_size,
        join=False,
        start_method=_START_METHOD,
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: workers did not finish in {timeout:.0f}s")
