"""One expert dW per weight over all forward chunks (`--fluid-moe-chunks` > 1).

Shape legend: G local experts, P ep size, C chunks; chunk c's expert input `[T_c, K]` and output
gradient `[T_c, N]` are expert-major, and within expert g ordered by source rank, then token
(FluidTokenDispatcher.dispatch_postprocess).

With forward pipelining each chunk's experts are their own grouped GEMMs, so without this each
chunk's backward computed its own `[G, N, K]` dW and added it into the fp32 `main_grad`: C dW
GEMMs on 1/C of the rows and C memory-bound adds of the whole expert main_grad per micro-batch,
where one chunk needs one. On one H200 (the 64-expert model, 2 chunks, no link) the adds alone
took 83.2 ms per step against 41.5 with one chunk (docs/benchmarks/overlap.md, "One GPU,
emulated link").

`ChunkedWgrad` collects each chunk's `(x, dy)` of one weight as its backward hands them over and,
once all C are in, runs the weight's dW once over the rows of every chunk. The dispatcher cuts
every (expert g, source rank r) segment of n rows at `floor(c*n/C)` (chunk_bounds), so taking,
for each g and r, the pieces of chunks 0..C-1 in order gives back exactly the rows of that
segment with one chunk, in the same order: the merged dW is the one-chunk dW, the same GEMM on the
same rows. The gather writes each chunk's rows once into a fresh `[T, K]` / `[T, N]` buffer (for
the 64-expert model about 0.4 GB per layer and micro-batch, estimated at 0.2 ms on an H200 from
the bytes); the dW then runs in the window where the last chunk's part arrives, one task instead
of C.

Checked against the one-chunk layout it must reproduce (tests/cpu/test_chunk_wgrad.py: the
merged rows bitwise on cut segments; a layer's gradients with 2 chunks against 1 within an fp32
bound, and scheduler on vs off bitwise; tests/gpu/chunk_wgrad_script.py the same on the grouped
GEMM path).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def merge_order(chunk_counts: Sequence[Sequence[int]], num_local_experts: int) -> np.ndarray:
    """Row indices into the C chunks' rows concatenated in chunk order that give the one-chunk
    expert-major order.

    Args:
        chunk_counts: per chunk c, `[P*G]` rows per (source rank r, local expert g), row-major
            (`DispatchPlan.recv_counts[c]`).
        num_local_experts: G.
    Returns:
        int64 `[sum of all counts]`: for g, then r, then c, the rows of (c, g, r).
    """
    G = num_local_experts
    counts = np.asarray([list(c) for c in chunk_counts], dtype=np.int64)  # [C, P*G]
    C = counts.shape[0]
    P = counts.shape[1] // G
    n_crg = counts.reshape(C, P, G)
    n_cgr = n_crg.transpose(0, 2, 1)  # chunk c's buffer is (g, r)-major
    start_in_chunk = (np.cumsum(n_cgr.reshape(C, -1), axis=1) - n_cgr.reshape(C, -1)).reshape(
        C, G, P
    )
    chunk_rows = n_cgr.reshape(C, -1).sum(axis=1)
    base = np.cumsum(chunk_rows) - chunk_rows  # [C] where chunk c starts in the concatenation
    starts = (start_in_chunk + base[:, None, None]).transpose(1, 2, 0).reshape(-1)  # (g, r, c)
    lens = n_cgr.transpose(1, 2, 0).reshape(-1)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # perm[i] = starts[k] + (i - first output index of piece k), piece k holding output row i
    piece_first = np.cumsum(lens) - lens
    return np.repeat(starts - piece_first, lens) + np.arange(total, dtype=np.int64)


def merged_counts(chunk_counts: Sequence[Sequence[int]], num_local_experts: int) -> list[int]:
    """`[G]` rows per local expert over all chunks (the one-chunk tokens_per_expert)."""
    G = num_local_experts
    counts = np.asarray([list(c) for c in chunk_counts], dtype=np.int64)
    return [int(v) for v in counts.reshape(counts.shape[0], -1, G).sum(axis=(0, 1))]


class ChunkedWgrad:
    """The chunks of one MoE layer forward, for their experts' dW (see the module docstring).

    Args:
        chunk_counts: per chunk, `[P*G]` received rows per (source rank, local expert).
        num_local_experts: G.
    Built by FluidMoELayer.forward when it runs more than one chunk; each chunk's grouped
    linears get a `ChunkPart` (`part(c, name)`).
    """

    def __init__(self, chunk_counts: Sequence[Sequence[int]], num_local_experts: int):
        self.chunk_counts = [list(c) for c in chunk_counts]
        self.num_chunks = len(self.chunk_counts)
        self.num_local_experts = num_local_experts
        self._parts: dict[str, dict[int, tuple]] = {}

    def part(self, chunk: int, name: str) -> "ChunkPart":
        return ChunkPart(self, chunk, name)

    def add(self, chunk: int, name: str, x: torch.Tensor, dy: torch.Tensor):
        """Hand over chunk `chunk`'s `(x [T_c, K], dy [T_c, N])` of weight `name`. Returns None
        until every chunk's part of that weight is in, then a `MergedRows` (and forgets the
        parts)."""
        parts = self._parts.setdefault(name, {})
        if chunk in parts:
            raise RuntimeError(f"ChunkedWgrad: chunk {chunk} of {name} handed over twice")
        parts[chunk] = (x, dy)
        if len(parts) < self.num_chunks:
            return None
        del self._parts[name]
        return MergedRows(
            [parts[c] for c in range(self.num_chunks)], self.chunk_counts, self.num_local_experts
        )


class MergedRows:
    """All chunks' `(x, dy)` of one weight. `counts`: `[G]` host ints of the merged rows;
    `gather()` -> `(x [T, K], dy [T, N])` in the one-chunk order (two copies, issued when the dW
    runs, inside its window)."""

    def __init__(self, parts: list, chunk_counts: list, num_local_experts: int):
        self._parts = parts
        self._chunk_counts = chunk_counts
        self._num_local_experts = num_local_experts
        self.counts = merged_counts(chunk_counts, num_local_experts)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = merge_order(self._chunk_counts, self._num_local_experts)
        dest = np.empty_like(order)  # where each concatenated row goes: the inverse of `order`
        dest[order] = np.arange(order.shape[0], dtype=np.int64)
        dest_t = torch.from_numpy(dest)
        x0, dy0 = self._parts[0]
        if x0.is_cuda:
            dest_t = dest_t.pin_memory().to(x0.device, non_blocking=True)
        rows = [x.shape[0] for x, _ in self._parts]
        x_all = x0.new_empty((sum(rows), x0.shape[1]))
        dy_all = dy0.new_empty((sum(rows), dy0.shape[1]))
        for (x, dy), d in zip(self._parts, dest_t.split(rows), strict=True):
            x_all.index_copy_(0, d, x)  # distinct destinations: every row written once
            dy_all.index_copy_(0, d, dy)
        return x_all, dy_all


class ChunkPart:
    """What one chunk's grouped linear knows of the merge: its chunk index and weight name."""

    def __init__(self, owner: ChunkedWgrad, chunk: int, name: str):
        self.owner, self.chunk, self.name = owner, chunk, name

    def add(self, x: torch.Tensor, dy: torch.Tensor):
        """`ChunkedWgrad.add` for this part."""
        return self.owner.add(self.chunk, self.name, x, dy)
