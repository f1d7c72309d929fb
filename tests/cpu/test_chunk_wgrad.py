"""Tier: cpu. One expert dW over all forward chunks (fluid.moe.chunk_wgrad).

- The merge order: the dispatcher cuts every (expert, source rank) segment of n rows at
  floor(c*n/C) (chunk_bounds); handing the chunks' expert-major buffers to ChunkedWgrad in any
  order gives back the one-chunk rows and counts bit for bit (a gather: same values by
  construction), so the merged dW is the one-chunk dW GEMM.
- Through a MoE layer (the 64-expert model's structure, one rank): with 2 chunks each expert
  weight has one dW task per micro-batch, as with one chunk (it had one per chunk); gradients
  are bitwise the same with the scheduler deferring into windows (an emulated link) and with
  the scheduler off (dW inline: the merged dW runs where the last chunk's backward is); and
  they match one chunk's within an fp32 bound: the chunks' forward GEMMs and top-k sums run on
  other row sets (a few ulp, times sqrt(#terms) < 1e-6 relative at these sizes; a wrong row
  order or a lost chunk is O(1)).
"""

import pytest
import torch

from fluid.moe.chunk_wgrad import ChunkedWgrad, merge_order, merged_counts
from fluid.moe.dispatcher import chunk_bounds
from fluid.testing.world import single_rank_megatron


def _one_chunk_and_chunks(P, G, C, seed):
    """Random counts per (rank, expert) (zeros included); the one-chunk expert-major rows
    `[T, 3]` (row i holds i) and the C chunk buffers as dispatch_postprocess lays them out."""
    g = torch.Generator().manual_seed(seed)
    counts_rg = torch.randint(0, 7, (P * G,), generator=g).tolist()
    counts_rg[1] = 0
    one = []  # (g, r)-major, each segment's rows in order
    seg = {}
    row = 0
    for e in range(G):
        for r in range(P):
            n = counts_rg[r * G + e]
            seg[(e, r)] = list(range(row, row + n))
            one += seg[(e, r)]
            row += n
    chunk_counts, chunks = [], []
    for c in range(C):
        rows_c, counts_c = [], [0] * (P * G)
        for e in range(G):
            for r in range(P):
                b = chunk_bounds(len(seg[(e, r)]), C)
                piece = seg[(e, r)][b[c] : b[c + 1]]
                rows_c += piece
                counts_c[r * G + e] = len(piece)
        chunk_counts.append(counts_c)
        chunks.append(torch.tensor(rows_c, dtype=torch.float32).unsqueeze(1).repeat(1, 3))
    x_one = torch.tensor(one, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    tpe = [sum(counts_rg[r * G + e] for r in range(P)) for e in range(G)]
    return x_one, tpe, chunk_counts, chunks


@pytest.mark.parametrize("P,G,C", [(1, 4, 2), (2, 3, 2), (2, 3, 3), (4, 2, 4)])
def test_merged_rows_are_the_one_chunk_rows(P, G, C):
    x_one, tpe, chunk_counts, chunks = _one_chunk_and_chunks(P, G, C, seed=P * 10 + C)
    assert merged_counts(chunk_counts, G) == tpe
    assert sorted(merge_order(chunk_counts, G).tolist()) == list(range(x_one.shape[0]))
    merge = ChunkedWgrad(chunk_counts, G)
    got = None
    for c in reversed(range(C)):  # backward hands the chunks over last first
        dy = -chunks[c]
        got = merge.add(c, "fc1", chunks[c], dy)
        if c:
            assert got is None
    assert got is not None and got.counts == tpe
    x_all, dy_all = got.gather()
    assert torch.equal(x_all, x_one) and torch.equal(dy_all, -x_one)
    with pytest.raises(RuntimeError, match="twice"):
        merge.add(0, "fc2", chunks[0], chunks[0])
        merge.add(0, "fc2", chunks[0], chunks[0])


@pytest.fixture(scope="module")
def _world():
    with single_rank_megatron():
        yield


def _train(chunks, n=3, **fluid):
    """n micro-batches through the tiny 64-expert layer with `chunks` forward chunks; the
    main_grads and the expert weights' dW tasks per micro-batch."""
    from fluid.testing.moe import fine_grained_test_layer, reset_ddp_flags, set_num_chunks

    layer, accs = fine_grained_test_layer(64, **fluid)  # noqa: F841 (DDP hooks)
    set_num_chunks(layer, chunks)
    reset_ddp_flags(layer.parameters())
    sched = layer.scheduler
    g = torch.Generator().manual_seed(3)
    tasks = []
    for _ in range(n):
        x = torch.randn(48, 1, 64, generator=g).requires_grad_(True)
        before = sched.get_stats()["total_dw_tasks"]
        out, _ = layer(x)
        out.backward(torch.randn(48, 1, 64, generator=g))
        tasks.append(sched.get_stats()["total_dw_tasks"] - before)
    return {k: p.main_grad.clone() for k, p in layer.named_parameters()}, tasks, sched.get_stats()


def test_two_chunks_one_dw_per_weight_same_gradients(_world):
    on, tasks_on, stats_on = _train(2, fluid_emulate_link_gbps=9.0)
    off, tasks_off, _ = _train(2, fluid_emulate_link_gbps=9.0, fluid_scheduler=False)
    one, tasks_one, _ = _train(1, fluid_emulate_link_gbps=9.0)
    assert stats_on["overlapped_dw_tasks"] > 0  # the merged dW ran in a window
    # the same number of dW tasks as with one chunk: one per expert weight, not one per chunk
    assert tasks_on == tasks_one, (tasks_on, tasks_one)
    assert tasks_off == tasks_one, (tasks_off, tasks_one)
    for k in on:
        assert torch.equal(on[k], off[k]), k  # scheduler on vs off: the same operations
        torch.testing.assert_close(on[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
