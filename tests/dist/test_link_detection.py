"""Tier: dist (4 gloo ranks on CPU). `fluid.comm.context._link_is_slow` gathers each rank's host
id over the group for real: every rank replaces `socket.gethostname` with the name of the node
it plays, so one machine stands for 2 nodes x 2 GPUs. (A CommContext on gloo never asks: the
function is called directly.) The rules themselves, launcher by launcher, are
tests/cpu/test_link_detection.py.
"""

import os
import socket

import torch.distributed as dist

from tests._dist import run_distributed


def _layouts_body(rank, world):
    from fluid.comm.context import _link_is_slow

    for var in ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_HOSTID"):
        os.environ.pop(var, None)
    # An environment that says nothing of nodes (srun without LOCAL_WORLD_SIZE).
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    pairs = [(0, 1), (2, 3), (0, 2), (1, 3)]
    groups = {p: dist.new_group(list(p)) for p in pairs}  # every rank creates every group
    groups[(0, 1, 2, 3)] = dist.group.WORLD

    def check(node_of, label):
        socket.gethostname = lambda: f"node{node_of(rank)}"
        for ranks, group in groups.items():
            if rank in ranks:
                expect = len({node_of(r) for r in ranks}) > 1
                got = _link_is_slow(group)
                assert got is expect, (label, ranks, rank, got)
        dist.barrier()

    # Guards: a rule that never sees the other ranks' hosts (the earlier one judged every group
    # fast without LOCAL_WORLD_SIZE), and one that compares node indices rank // 2 (wrong for
    # the cyclic layout, where {0,1} spans hosts and {0,2} does not).
    check(lambda r: r // 2, "node-major")  # {0,1},{2,3} fast; {0,2},{1,3}, world slow
    check(lambda r: r % 2, "cyclic")  # {0,2},{1,3} fast; {0,1}, world slow
    check(lambda r: 0, "one node")  # everything fast
    # P2P off: slow even on one node, and answered on each rank without the gather.
    os.environ["NCCL_P2P_DISABLE"] = "1"
    assert _link_is_slow(dist.group.WORLD) is True


def test_link_detection_by_host_over_gloo():
    run_distributed(_layouts_body, 4, timeout=120)
