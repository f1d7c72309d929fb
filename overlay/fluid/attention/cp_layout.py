"""Megatron's load-balanced context-parallel sequence layout, and how to undo/redo it.

Megatron splits a sequence of S tokens into 2*cp chunks of c = S/(2*cp) tokens and gives rank r
the chunks r and 2*cp-1-r (`get_batch_on_this_cp_rank`, `get_pos_emb_on_this_cp_rank`), so every
rank gets the same amount of causal-attention work. After the Ulysses sp2hp all-to-all, rows are
concatenated rank-major:

    zigzag order:  [rank 0: chunk 0, chunk 2cp-1 | rank 1: chunk 1, chunk 2cp-2 | ...]
    natural order: [chunk 0, chunk 1, ..., chunk 2cp-1]

Attention needs the natural order (the causal mask is positional); the hp2sp all-to-all needs the
zigzag order back. Both are a permutation of 2*cp equal row blocks, done as one `torch.cat` of
block views whose backward is the inverse permutation (one copy each way: no zero-filled gradient
buffer per block as autograd's slicing backward would make, no index tensor uploaded to the device,
deterministic everywhere).
"""

from __future__ import annotations

import torch


def zigzag_chunk_order(cp: int) -> list[int]:
    """`order[j]` = position in zigzag order of natural chunk j (j in [0, 2*cp))."""
    return [2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1 for j in range(2 * cp)]


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for dst, src in enumerate(perm):
        inv[src] = dst
    return inv


class _PermuteBlocks(torch.autograd.Function):
    """`out[j] = x[perm[j]]` over dim 0 of `x` viewed as `[len(perm), -1]`."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.inv = inv
        blocks = x.reshape(len(perm), -1)
        return torch.cat([blocks[p] for p in perm]).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return _PermuteBlocks.apply(grad, ctx.inv, _inverse(ctx.inv)), None, None


def zigzag_to_natural(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Reorder dim 0 of `x` (`[S, ...]` or `[S*b, ...]`, S split into 2*cp equal row blocks) from
    zigzag (rank-major, as the sp2hp all-to-all returns it) to natural sequence order."""
    if cp == 1:
        return x
    if x.shape[0] % (2 * cp):
        raise ValueError(f"dim 0 ({x.shape[0]}) is not divisible by 2*cp ({2 * cp})")
    perm = zigzag_chunk_order(cp)
    return _PermuteBlocks.apply(x, perm, _inverse(perm))


def natural_to_zigzag(x: torch.Tensor, cp: int) -> torch.Tensor:
    """Inverse of `zigzag_to_natural`."""
    if cp == 1:
        return x
    if x.shape[0] % (2 * cp):
        raise ValueError(f"dim 0 ({x.shape[0]}) is not divisible by 2*cp ({2 * cp})")
    perm = _inverse(zigzag_chunk_order(cp))
    return _PermuteBlocks.apply(x, perm, _inverse(perm))


def shard_sequence(x: torch.Tensor, cp: int, rank: int, seq_dim: int = 0) -> torch.Tensor:
    """Rank `rank`'s part of a full sequence in Megatron's layout: chunks rank and 2cp-1-rank.

    Reference for tests and benchmarks (same slicing as `get_pos_emb_on_this_cp_rank`), not used
    on the training path, where Megatron's data loader already delivers the shard.
    """
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=seq_dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=seq_dim)
