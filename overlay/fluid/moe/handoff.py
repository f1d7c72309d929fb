"""Device tensors that one stage of a Fluid MoE layer leaves for a later stage on another stream.

Megatron's combined-1F1B schedule (`--overlap-moe-expert-parallel-comm`) runs a MoE layer's stages
as separate nodes: router and permutation (pre-dispatch) and the experts on its compute stream,
dispatch and combine (with the unpermute) on its communication stream, the forward of micro-batch
i+1 interleaved with the backward of micro-batch i. Node inputs and outputs are the schedule's to
order and free (its per-micro-batch event, `free_input` with `record_stream`). What
FluidTokenDispatcher keeps in its DispatchPlan between stages is Fluid's:
  - `offs`, the grouped GEMM's int32 offsets, copied host->device in the dispatch node, read by
    the experts node (forward, dX and dW);
  - `sorted_indices`, the permutation of the pre-dispatch node, read by the unpermute of the
    combine node and saved for its backward.
Two hazards, both fixed here:
  1. order: the consumer stream waits for an event recorded on the producer stream after the
     tensors were written (not relying on the schedule's own event chain);
  2. free: PyTorch's caching allocator gives a freed block back to the stream that allocated it,
     which reuses it at once. The last reference goes when autograd drops the consumer's graph, at
     the end of its backward on the host, with its kernels still queued. Then the producer stream,
     busy with the other micro-batch, writes its own data into the block: the next micro-batch's
     offsets landed in the block the experts' backward grouped GEMM was about to read (2x H200:
     device assert `offset <= tensor_ShapeA[0]` in prepare_grouped_gemm_data).
     `record_stream(consumer)` keeps the block until the consumer's queued work is done.
On one stream (the plain schedule) `take()` does nothing; FluidMoELayer.forward builds no handoff.
"""

from __future__ import annotations

from typing import Optional, TypeGuard

import torch

from fluid.comm.context import current_stream


def _on_cuda(t: Optional[torch.Tensor]) -> TypeGuard[torch.Tensor]:
    return t is not None and t.is_cuda


class Handoff:
    """Tensors written on the current stream, to be read by a later stage (`take`).

    Built right after the tensors were produced: records an event on the producing stream (CUDA
    only; on CPU it only holds the tensors)."""

    __slots__ = ("tensors", "stream", "event", "device_index", "_taken_on")

    def __init__(self, *tensors: Optional[torch.Tensor]):
        self.tensors = tensors
        self.stream = self.event = self.device_index = None
        self._taken_on: list = []
        cuda = [t for t in tensors if _on_cuda(t)]
        if cuda:
            self.device_index = cuda[0].device.index
            self.stream = current_stream(self.device_index)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)

    def take(self) -> tuple:
        """The tensors, safe to use on the current stream: on another stream than the producer's
        it waits for the producer's event and marks every tensor used there (`record_stream`),
        once per stream."""
        if self.stream is not None:
            consumer = current_stream(self.device_index)
            if consumer != self.stream and not any(s == consumer for s in self._taken_on):
                assert self.event is not None  # recorded with the stream
                consumer.wait_event(self.event)
                for t in self.tensors:
                    if _on_cuda(t):
                        t.record_stream(consumer)
                self._taken_on.append(consumer)
        return self.tensors
