"""Ulysses layout changes: sequence-parallel <-> head-parallel, with Megatron's exact semantics.

`fluid_all_to_all_sp2hp(x, comm)`: `[T/cp, H]` -> `[T, H/cp]` (any leading dims are flattened into
tokens, as Megatron's `all_to_all_sp2hp` does). Rank r's local tokens come out as rows
`[r*T/cp, (r+1)*T/cp)`, and the output keeps hidden columns `[rank*H/cp, (rank+1)*H/cp)`.
`fluid_all_to_all_hp2sp(x, comm)` is its inverse, `[T, H/cp]` -> `[T/cp, H]`.

These match `megatron.core.tensor_parallel.mappings.all_to_all_sp2hp/hp2sp` bit for bit (tested in
tests/dist/test_comm.py against Megatron's functions on gloo), but run through `fluid_all_to_all`,
so their backward all-to-alls open scheduler windows, and `async_op=True` returns a handle so that
q, k and v can be exchanged concurrently.

Process-group form (FluidMoE v0.5's documented call): `fluid_all_to_all_sp2hp(x, group=cp_group)`
and `fluid_all_to_all_hp2sp(x, group=cp_group)` keep the layout of `x` instead of flattening it:
`[s/cp, b, heads, head_dim]` <-> `[s, b, heads/cp, head_dim]` (v0.5's shapes), and for a 2-D or
3-D `x` the last dim is the one divided (`[s/cp, b, H]` <-> `[s, b, H/cp]`). The exchanged data
is the same as the flattened form's (heads `[r*heads/cp, (r+1)*heads/cp)` to rank r, sequence
blocks in rank order). The CommContext a group-form call runs through is the one of a runtime
(fluid.runtime), which keeps one per process group: the model's (the latest built, as
`get_backward_scheduler()` picks), so the call shares the context of the model's layers and its
backward windows take the model's deferred dW; without a model, `standalone_runtime()`'s. A context
is built once per group and runtime, not per call: on CUDA it owns a stream, and on NCCL building
it is a collective over the group (the link probe, fluid.comm.context._link_is_slow).
"""

from __future__ import annotations

from typing import Optional

import torch

from fluid.comm.all_to_all import fluid_all_to_all
from fluid.comm.context import CommContext


def _resolve(comm: Optional[CommContext], group, name: str) -> CommContext:
    if (comm is None) == (group is None):
        raise TypeError(f"{name}: pass either a CommContext (comm) or a process group (group=)")
    return comm if comm is not None else _group_comm(group)


def _group_comm(group) -> CommContext:
    """The context of `group` kept by the model's runtime, or the standalone one (module doc).

    Not a cache of this module's: the runtime that holds the model's contexts is the owner whose
    lifetime and settings they should have. A weak cache keyed by the group could not drop an
    entry anyway: the context refers to its group, so the key would never die."""
    from fluid.runtime import latest_runtime, standalone_runtime

    return (latest_runtime() or standalone_runtime()).comm(group)


def _split_dim(x: torch.Tensor) -> int:
    """The dim the group form divides by cp: heads (dim 2) of a 4-D `[s, b, heads, head_dim]`,
    else the last."""
    return 2 if x.dim() == 4 else x.dim() - 1


def fluid_all_to_all_sp2hp(
    x: torch.Tensor, comm: Optional[CommContext] = None, *, group=None, async_op: bool = False
):
    """`[T/cp, H]` -> `[T, H/cp]`; returns the tensor, or `(tensor, handle)` with async_op.

    With `group=` instead of `comm` (see the module docstring): `[s/cp, b, heads, head_dim]` ->
    `[s, b, heads/cp, head_dim]`, or `[s/cp, ..., H]` -> `[s, ..., H/cp]`; no async_op.
    """
    if group is not None or comm is None:
        comm = _resolve(comm, group, "fluid_all_to_all_sp2hp")
        if async_op:
            raise ValueError("fluid_all_to_all_sp2hp: async_op needs a CommContext (comm)")
        if x.dim() < 2:
            raise ValueError(f"fluid_all_to_all_sp2hp: x must be [s/cp, ..., H]: {tuple(x.shape)}")
        d = _split_dim(x)
        if x.shape[d] % comm.size:
            raise ValueError(f"dim {d} of {tuple(x.shape)} is not divisible by CP size {comm.size}")
        flat = x.reshape(-1, x.shape[d:].numel())
        out = fluid_all_to_all_sp2hp(flat, comm)
        cp = comm.size
        return out.reshape(x.shape[0] * cp, *x.shape[1:d], x.shape[d] // cp, *x.shape[d + 1 :])
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


def fluid_all_to_all_hp2sp(
    x: torch.Tensor, comm: Optional[CommContext] = None, *, group=None, async_op: bool = False
):
    """`[T, H/cp]` -> `[T/cp, H]`; with async_op returns an object whose `wait()` gives it.

    With `group=` instead of `comm` (see the module docstring): `[s, b, heads/cp, head_dim]` ->
    `[s/cp, b, heads, head_dim]`, or `[s, ..., H/cp]` -> `[s/cp, ..., H]`; no async_op.
    """
    if group is not None or comm is None:
        comm = _resolve(comm, group, "fluid_all_to_all_hp2sp")
        if async_op:
            raise ValueError("fluid_all_to_all_hp2sp: async_op needs a CommContext (comm)")
        if x.dim() < 2 or x.shape[0] % comm.size:
            raise ValueError(
                f"fluid_all_to_all_hp2sp: x must be [s, ..., H/cp] with s divisible by the CP size "
                f"{comm.size}, got {tuple(x.shape)}"
            )
        d = _split_dim(x)
        out = fluid_all_to_all_hp2sp(x.reshape(-1, x.shape[d:].numel()), comm)
        cp = comm.size
        return out.reshape(x.shape[0] // cp, *x.shape[1:d], x.shape[d] * cp, *x.shape[d + 1 :])
    cp = comm.size
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] % cp:
        raise ValueError(f"token count {x.shape[0]} is not divisible by the CP size {cp}")
    if async_op:
        raw, handle = fluid_all_to_all(comm, x, async_op=True)
        return _Deferred(raw, handle, cp)
    return _hp2sp_post(fluid_all_to_all(comm, x), cp)
