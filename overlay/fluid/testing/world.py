"""Test-only (not in the wheel): a one-process Megatron world for the single-process CPU tests
(tests/cpu/test_linear.py, test_autograd_semantics.py); training never imports it.

`single_rank_megatron()`: a context manager that gives the process a 1-rank gloo default group on
a free loopback port and Megatron's model-parallel state (TP = PP = EP = 1), and tears down what
it created on exit; what already existed (another test module's) is kept as it is.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_megatron() -> Iterator[None]:
    """A 1-rank gloo group and Megatron's parallel state, each created only if absent."""
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    made_mp = not parallel_state.model_parallel_is_initialized()
    if made_mp:
        parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        if made_mp:
            parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
