"""Ulysses layout changes: sequence-parallel <-> head-parallel, with Megatron's exact semantics.

`fluid_all_to_all_sp2hp(x, comm)`: `[T/cp, H]` -> `[T, H/cp]` (any leading dims are flattened into
tokens, as Megatron's `all_to_all_sp2hp` does). Rank r's local tokens come out as rows
`[r*T/cp, (r+1)*T/cp)`, and the output keeps hidden columns `[rank*H/cp, (rank+1)*H/cp)`.
`fluid_all_to_all_hp2sp(x, comm)` is its inverse, `[T, H/cp]` -> `[T/cp, H]`.

These match `megatron.core.tensor_parallel.mappings.all_to_all_sp2hp/hp2sp` bit for bit (tested in
tests/dist/test_comm.py against Megatron's functions on gloo), but run through `fluid_all_to_all`,
so their backward all-to-alls open scheduler windows, and `async_op=True` returns a handle so that
q, k and v can be exchanged concurrently.
"""

from __future__ import annotations

import torch

from fluid.comm.all_to_all import fluid_all_to_all
from fluid.comm.context import CommContext


def fluid_all_to_all_sp2hp(x: torch.Tensor, comm: CommContext, *, async_op: bool = False):
    """`[T/cp, H]` -> `[T, H/cp]`; returns the tensor, or `(tensor, handle)` with async_op."""
    cp = comm.size
    x = x.reshape(-1, x.shape[-1])
    if x.shape[-1] % cp:
        raise ValueError(f"hidden size {x.shape[-1]} is not divisible by the CP size {cp}")
    chunks = torch.split(x, x.shape[-1] // cp, dim=1)
    return fluid_all_to_all(comm, torch.cat(chunks, dim=0), async_op=async_op)


def _hp2sp_post(y: torch.Tensor, cp: int) -> torch.Tensor:
    y = y.reshape(-1, y.shape[-1])
    return torch.cat(torch.split(y, y.shape[0] // cp, dim=0), dim=-1)


class _Deferred:
    """An async hp2sp: `wait()` finishes the exchange and returns the re-laid-out tensor."""

    def __init__(self, raw: torch.Tensor, handle, cp: int):
        self.raw, self.handle, self.cp = raw, handle, cp

    def wait(self) -> torch.Tensor:
        self.handle.wait()
        return _hp2sp_post(self.raw, self.cp)


def fluid_all_to_all_hp2sp(x: torch.Tensor, comm: CommContext, *, async_op: bool = False):
    """`[T, H/cp]` -> `[T/cp, H]`; with async_op returns an object whose `wait()` gives it."""
    cp = comm.size
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] % cp:
        raise ValueError(f"token count {x.shape[0]} is not divisible by the CP size {cp}")
    if async_op:
        raw, handle = fluid_all_to_all(comm, x, async_op=True)
        return _Deferred(raw, handle, cp)
    return _hp2sp_post(fluid_all_to_all(comm, x), cp)
