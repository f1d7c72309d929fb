"""Tier: gpu. `--fluid-emulate-link-gbps` on one GPU (fluid.comm.emulated_link): an emulated
all-to-all of a one-rank NCCL group delivers the input unchanged, takes the time its model says
(nbytes / 2 at the given GB/s) on the communication stream, and compute queued on the compute
stream after its launch runs beside it (the point of the emulation: the backward scheduler's
windows exist on one GPU). Bounds: the spin length comes from a clock rate measured at build, and
the GPU may change its clock under load, so the transfer is checked to within 15% of the model."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.gpu._torchrun import require_gpus


@pytest.fixture(scope="module")
def one_rank_nccl():
    require_gpus(1)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


def _elapsed_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def test_emulated_all_to_all_time_and_overlap(one_rank_nccl):
    from fluid.comm import CommContext, fluid_all_to_all
    from fluid.comm.emulated_link import EmulatedLink

    comm = CommContext(one_rank_nccl, emulated_link=EmulatedLink(10.0))
    assert comm.slow_link() and comm.should_overlap() and comm.resolved_sm_carveout() == 8
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)  # 32 MiB
    want_ms = comm.emulated_link.seconds(x.numel() * 2) * 1e3  # 1.68 ms at 10 GB/s

    def a2a():
        out, handle = fluid_all_to_all(comm, x, [x.shape[0]], [x.shape[0]], async_op=True)
        handle.wait()
        return out

    a2a()  # warm
    out = [None]
    ms = min(_elapsed_ms(lambda: out.__setitem__(0, a2a())) for _ in range(5))
    assert torch.equal(out[0], x)
    assert abs(ms - want_ms) < 0.15 * want_ms, (ms, want_ms)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        a @ a
    gemm_ms = min(_elapsed_ms(lambda: a @ a) for _ in range(5))

    def both():
        o, handle = fluid_all_to_all(comm, x, [x.shape[0]], [x.shape[0]], async_op=True)
        with comm.beside_comm():
            a @ a
        handle.wait()

    both()
    both_ms = min(_elapsed_ms(both) for _ in range(5))
    # beside each other: well under the sum (the spin holds one SM block; the GEMM leaves 8 free)
    assert both_ms < 0.8 * (ms + gemm_ms), (both_ms, ms, gemm_ms)
