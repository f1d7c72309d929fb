"""Expert row counts between the device, where routing computes them, and the host.

The MoE layer's counts (`[E]` rows per expert, and with EP > 1 the exchanged `[P*G]`) are made on
the device. An all-to-all needs them on the host as split sizes, so over an EP group the forward
waits for them once per layer (FluidTokenDispatcher). At EP = 1 nothing is sent and the grouped
GEMM takes device offsets, so `HostCounts` defers the wait to the first value anything reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from fluid.comm.context import current_stream


class PendingCounts:
    """`[n]` counts on their way to the host: `get()` waits (the single sync) and returns a list;
    `len()` is n without waiting."""

    def __init__(self, counts_device: torch.Tensor):
        self._n = counts_device.shape[0]
        if counts_device.is_cuda:
            self.host = torch.empty(counts_device.shape, dtype=counts_device.dtype, pin_memory=True)
            self.host.copy_(counts_device, non_blocking=True)
            self.event: Optional[torch.cuda.Event] = torch.cuda.Event()
            self.event.record(current_stream(counts_device.device.index))
        else:
            self.host, self.event = counts_device, None
        self._list: Optional[list[int]] = None

    def __len__(self) -> int:
        return self._n

    def get(self) -> list[int]:
        if self._list is None:
            if self.event is not None:
                self.event.synchronize()
            self._list = [int(c) for c in self.host.tolist()]
        return self._list


class HostCounts(Sequence):
    """Rows per local expert as host ints, read from the device only when a value is asked for.

    What the one-chunk EP = 1 plan gives as tokens_per_expert
    (FluidTokenDispatcher._finish_local_plan): `len()` is known at once; the first value read
    waits for the device->host copy that dispatch_preprocess started (`PendingCounts.get`). On the grouped-GEMM path nothing in the forward reads a value
    (the kernel takes device offsets), and backward reads them (empty experts' dW, the per-expert
    fused dW) after the forward's copy has long finished: the forward never waits for the device.
    Read in the forward it is the same one wait the host list had (the per-expert loop)."""

    def __init__(self, pending: PendingCounts):
        self._pending = pending

    def __len__(self) -> int:
        return len(self._pending)

    def __getitem__(self, i):
        return self._pending.get()[i]

    def __iter__(self):
        return iter(self._pending.get())

    def __repr__(self) -> str:
        known = self._pending._list is not None
        return f"HostCounts({self._pending.get() if known else f'<{len(self)} pending>'})"


def local_offsets(counts: torch.Tensor) -> Optional[torch.Tensor]:
    """int32 cumulative `[G]` counts for `torch._grouped_mm` from the device counts (one kernel,
    no host round trip), or None on CPU, like `offsets_for`."""
    if not counts.is_cuda:
        return None
    return torch.cumsum(counts, 0, dtype=torch.int32)
