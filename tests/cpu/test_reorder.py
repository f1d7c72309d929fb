"""Tier: cpu. The dispatcher's expert-major reorder as one gather (reorder_indices, gather_rows)
against the split-and-cat construction it replaces: same rows, bit for bit, both directions, and
its backward is the inverse gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluid.moe.dispatcher import gather_rows, reorder_indices, upload_indices


def _cat_reorder(x, counts_rg, P, G):
    pieces = list(x.split(list(counts_rg)))
    return torch.cat([pieces[r * G + g] for g in range(G) for r in range(P)])


@pytest.mark.parametrize("P,G,seed", [(2, 4, 0), (4, 2, 1), (2, 32, 2), (3, 5, 3), (4, 16, 4)])
def test_gather_equals_split_and_cat(P, G, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 7, (P * G,), generator=gen).tolist()
    counts[0] = 0  # empty segments, first and in the middle
    counts[len(counts) // 2] = 0
    n = sum(counts)
    x = torch.randn(n, 3, generator=gen)
    idx, inv = reorder_indices(counts, P, G)
    assert sorted(idx.tolist()) == list(range(n)) and np.array_equal(inv[idx], np.arange(n))
    idx_t, inv_t = upload_indices([idx, inv], "cpu")
    want = _cat_reorder(x, counts, P, G)
    got = gather_rows(x, idx_t, inv_t)
    assert torch.equal(got, want)
    assert torch.equal(gather_rows(got, inv_t, idx_t), x)  # and back

    xr = x.clone().requires_grad_(True)
    dy = torch.randn(n, 3, generator=gen)
    gather_rows(xr, idx_t, inv_t).backward(dy)
    xc = x.clone().requires_grad_(True)
    _cat_reorder(xc, counts, P, G).backward(dy)
    assert torch.equal(xr.grad, xc.grad)


def test_no_rows():
    idx, inv = reorder_indices([0, 0, 0, 0], 2, 2)
    assert idx.shape == inv.shape == (0,)
    idx_t, inv_t = upload_indices([idx, inv], "cpu")
    assert gather_rows(torch.empty(0, 5), idx_t, inv_t).shape == (0, 5)
