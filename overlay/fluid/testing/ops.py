"""Test-only: count the aten ops a piece of code dispatches (each op is one kernel launch on a GPU,
except views and allocations), for the launch-count guards of host-bound layers."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """`with CountOps() as c: ...` counts every aten op dispatched inside, by name (overload
    packet, e.g. "zeros", "index_add_"), into `c.ops`; entering again adds to the same counts."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
