"""Tier: dist (2 and 4 gloo ranks on CPU). fluid_all_to_all with uneven splits against a
reference built from all_gather, forward and backward; the Ulysses sp2hp/hp2sp layouts against
Megatron's own functions and as a round trip.

Tolerances: the all-to-all moves data and its backward moves gradients, so every comparison here
is exact (torch.equal): no arithmetic happens that could round differently.
"""

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

HIDDEN = 5


def _splits(world, seed):
    """splits[src][dst] = rows src sends dst; zeros included on purpose."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (world, world), generator=g)
    s[0, world - 1] = 0  # a rank that sends nothing to another
    return s


def _uneven_body(rank, world):
    from fluid.comm import CommContext, fluid_all_to_all

    comm = CommContext(dist.group.WORLD)
    splits = _splits(world, 7)
    in_splits = splits[rank].tolist()
    out_splits = splits[:, rank].tolist()
    torch.manual_seed(100 + rank)
    x = torch.randn(sum(in_splits), HIDDEN, requires_grad=True)
    out = fluid_all_to_all(comm, x, out_splits, in_splits)

    # Reference: gather every rank's input (padded to a common length), then cut.
    n_max = int(splits.sum(1).max())
    pad = torch.zeros(n_max, HIDDEN)
    pad[: x.shape[0]] = x.detach()
    gathered = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(gathered, pad)
    ref = []
    for src in range(world):
        start = int(splits[src, :rank].sum())
        ref.append(gathered[src][start : start + int(splits[src, rank])])
    assert torch.equal(out, torch.cat(ref))

    # Backward: d(sum(out * w))/dx, where w is a known per-rank weight; the gradient of the rows
    # x sent to rank dst is rank dst's w for those rows.
    torch.manual_seed(200 + rank)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    w_pad = torch.zeros(int(splits.sum(0).max()), HIDDEN)
    w_pad[: w.shape[0]] = w
    w_all = [torch.empty_like(w_pad) for _ in range(world)]
    dist.all_gather(w_all, w_pad)
    ref_grad = []
    for dst in range(world):
        start = int(splits[:rank, dst].sum())
        ref_grad.append(w_all[dst][start : start + int(splits[rank, dst])])
    assert torch.equal(x.grad, torch.cat(ref_grad))

    # async_op returns a handle; the result is the same once waited.
    out2, handle = fluid_all_to_all(comm, x.detach(), out_splits, in_splits, async_op=True)
    handle.wait()
    assert torch.equal(out2, out.detach())

    # A caller-allocated output (what an early `ready` event requires) is filled in place.
    buf = torch.empty(sum(out_splits), HIDDEN)
    out3, handle = fluid_all_to_all(comm, x.detach(), out_splits, in_splits, async_op=True, out=buf)
    handle.wait()
    assert out3.data_ptr() == buf.data_ptr() and torch.equal(out3, out.detach())
    # An early `ready` event without a buffer allocated before it is refused: a buffer allocated
    # at launch may still be in use by compute queued after `ready` (the collective would race it).
    with pytest.raises(ValueError, match="needs `out`"):
        fluid_all_to_all(comm, x.detach(), out_splits, in_splits, ready=object())
    # A bad SM carve-out (--fluid-sm-carveout) fails when the context is built, naming the flag.
    for bad in ("abc", -3):
        msg = f"--fluid-sm-carveout must be 'auto' or an int >= 0, not {bad!r}"
        with pytest.raises(ValueError, match=msg):
            CommContext(dist.group.WORLD, sm_carveout=bad)


def _ulysses_body(rank, world):
    from megatron.core.tensor_parallel.mappings import all_to_all_hp2sp, all_to_all_sp2hp

    from fluid.comm import CommContext, fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp

    comm = CommContext(dist.group.WORLD)
    torch.manual_seed(rank)
    s_local, b, h = 3, 2, 4 * world
    x = torch.randn(s_local, b, h, requires_grad=True)
    hp = fluid_all_to_all_sp2hp(x, comm)
    ref_hp = all_to_all_sp2hp(x.detach(), group=dist.group.WORLD)
    assert hp.shape == (s_local * b * world, h // world)
    assert torch.equal(hp, ref_hp)
    back = fluid_all_to_all_hp2sp(hp, comm)
    assert torch.equal(back, all_to_all_hp2sp(ref_hp, group=dist.group.WORLD))
    assert torch.equal(back.view_as(x), x.detach())  # round trip
    back.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    deferred = fluid_all_to_all_hp2sp(hp.detach(), comm, async_op=True)
    assert torch.equal(deferred.wait(), back.detach())


def _body(rank, world):
    _uneven_body(rank, world)
    _ulysses_body(rank, world)


# One process group per world size runs every check (spawning ranks costs more than the checks).
@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_uneven_and_ulysses_layouts(world):
    run_distributed(_body, world)
