"""Tier: cpu. Link detection (`fluid.comm.context._link_is_slow`), which decides under the auto
policies whether any overlap happens at all (CommContext.should_overlap), the SM carve-out and
deduplicated dispatch.

What must hold:
  - NCCL's P2P transport off -> slow, read the way NCCL reads it (`NCCL_P2P_DISABLE` parsing as
    the integer 1, else `NCCL_P2P_LEVEL` LOC or 0), and answered without a collective;
  - otherwise slow exactly when the group's ranks are on more than one host, whatever the
    launcher's environment says (torchrun's LOCAL_WORLD_SIZE, srun's SLURM_*, mpirun's OMPI_*)
    and however ranks are laid out over hosts;
  - an NCCL CommContext resolves it once, at construction (it is a collective over the group).

A cluster is simulated here: a group is a tuple of global ranks, and the host-id gather returns
each member's host from a table, as every rank of the group would receive it. The real gather
over gloo, with a different hostname per rank, is tests/dist/test_link_detection.py.
"""

import pytest
import torch.distributed as dist

from fluid.comm import context as ctx_mod
from fluid.comm.context import CommContext, _c_strtol, _host_id, _link_is_slow, _p2p_disabled
from fluid.schedule.scheduler import BackwardScheduler

NCCL_VARS = ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_HOSTID")
LAUNCHER_VARS = (
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_LOCALID",
    "SLURM_NNODES",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "OMPI_COMM_WORLD_SIZE",
)
# Environments of three launchers for 2 nodes x 2 GPUs (rank 0's view).
LAUNCHERS = {
    "torchrun": {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    "srun": {"SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "2"},
    "mpirun": {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
}
NODE_MAJOR = {0: "nodeA", 1: "nodeA", 2: "nodeB", 3: "nodeB"}  # torchrun's layout
CYCLIC = {0: "nodeA", 1: "nodeB", 2: "nodeA", 3: "nodeB"}  # srun --distribution=cyclic


class _Cluster:
    """Fakes the two torch.distributed calls `_link_is_slow` makes, for groups given as tuples
    of global ranks on hosts `hosts` (rank -> host id). Counts the gathers."""

    def __init__(self, monkeypatch, hosts):
        self.hosts, self.gathers = hosts, 0
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(group))
        monkeypatch.setattr(dist, "all_gather_object", self._gather)

    def _gather(self, out, obj, group=None):
        self.gathers += 1
        assert len(out) == len(group)
        out[:] = [self.hosts[r] for r in group]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in NCCL_VARS + LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def _env(monkeypatch, **values):
    for k, v in values.items():
        monkeypatch.setenv(k, v)


# -- P2P transport off ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "disable, level, off",
    [
        ("1", None, True),
        ("0x1", None, True),  # strtol base 0
        (" 1", None, True),  # leading space skipped by strtol
        ("01", None, True),  # octal 1
        ("1abc", None, True),  # strtol stops at the first non-digit
        ("true", None, False),  # NCCL: strtol("true") = 0, P2P stays on
        ("yes", None, False),
        ("2", None, False),  # NCCL compares with exactly 1
        ("0", None, False),
        ("", None, False),
        (None, "LOC", True),  # "never use P2P"
        (None, "0", True),  # old numbering: 0 = LOC
        ("0", "LOC", True),  # DISABLE not 1: LEVEL decides
        ("true", "LOC", True),
        ("1", "NVL", True),  # DISABLE=1 wins over LEVEL
        (None, "NVL", False),
        (None, "PIX", False),
        (None, "SYS", False),
        (None, "5", False),
        (None, "loc", False),  # NCCL's strcmp is case-sensitive and "loc" is no number
        (None, "", False),
        (None, None, False),
    ],
)
def test_p2p_disabled_reads_nccl_semantics(disable, level, off):
    # Guards: the earlier rule (any NCCL_P2P_DISABLE but "" and "0" is off) says "true", "yes"
    # and "2" are off, where NCCL keeps P2P on; a rule `== "1"` misses "0x1", " 1", "01";
    # ignoring NCCL_P2P_LEVEL misses LOC / 0.
    env = {
        k: v for k, v in (("NCCL_P2P_DISABLE", disable), ("NCCL_P2P_LEVEL", level)) if v is not None
    }
    assert _p2p_disabled(env) is off


def test_c_strtol_matches_c():
    # Guards the parser `_p2p_disabled` relies on (C strtol(s, NULL, 0); values from glibc).
    cases = {
        "1": 1,
        "0x1F": 31,
        "017": 15,
        "08": 0,
        "0x": 0,
        " -3": -3,
        "+7x": 7,
        "": 0,
        "abc": 0,
        "  12 ": 12,
    }
    assert {s: _c_strtol(s) for s in cases} == cases


def test_p2p_off_is_slow_without_a_collective(monkeypatch):
    # Guards the env shortcut: with P2P off the answer is slow even on one host, and no gather
    # runs (a rule that gathered first would, and one that ignored the env would say fast).
    cluster = _Cluster(monkeypatch, {r: "nodeA" for r in range(4)})
    for disable, level in (("1", None), (None, "LOC")):
        monkeypatch.delenv("NCCL_P2P_LEVEL", raising=False)
        monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
        if disable:
            monkeypatch.setenv("NCCL_P2P_DISABLE", disable)
        if level:
            monkeypatch.setenv("NCCL_P2P_LEVEL", level)
        assert _link_is_slow((0, 1, 2, 3)) is True
    assert cluster.gathers == 0


# -- groups over hosts ------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize(
    "group, slow",
    [((0, 1), False), ((2, 3), False), ((0, 2), True), ((1, 3), True), ((0, 1, 2, 3), True)],
    ids=["ep01", "ep23", "ep02", "ep13", "world"],
)
def test_two_nodes_two_gpus(monkeypatch, launcher, group, slow):
    # 2 nodes x 2 GPUs, node-major. Guards: the earlier rule read torchrun's LOCAL_WORLD_SIZE
    # only, so under srun or mpirun (no LOCAL_WORLD_SIZE) {0,2}, {1,3} and the world group were
    # judged fast: the policy for NVLink applied between nodes, silently.
    _env(monkeypatch, **LAUNCHERS[launcher])
    _Cluster(monkeypatch, NODE_MAJOR)
    assert _link_is_slow(group) is slow


@pytest.mark.parametrize(
    "group, slow",
    [((0, 1), True), ((0, 2), False), ((1, 3), False), ((0, 1, 2, 3), True)],
    ids=["ep01", "ep02", "ep13", "world"],
)
def test_non_contiguous_layout(monkeypatch, group, slow):
    # Ranks alternate over the hosts (srun --distribution=cyclic, mpirun --map-by node), with a
    # LOCAL_WORLD_SIZE exported as well. Guards: rank // LOCAL_WORLD_SIZE as the node index
    # puts {0,1} on one node (fast, really spans) and {0,2} on two (slow, really one host).
    _env(monkeypatch, **LAUNCHERS["torchrun"])
    _Cluster(monkeypatch, CYCLIC)
    assert _link_is_slow(group) is slow


@pytest.mark.parametrize(
    "p2p",
    [{}, {"NCCL_P2P_DISABLE": "0", "NCCL_P2P_LEVEL": "NVL"}],
    ids=["default", "p2p_explicitly_on"],
)
def test_single_node_nvlink_is_fast(monkeypatch, p2p):
    # One host, 4 GPUs with NVLink, P2P on by default or explicitly (NCCL_P2P_DISABLE=0,
    # NCCL_P2P_LEVEL=NVL). Guards: reading "NCCL_P2P_DISABLE is set" or "NCCL_P2P_LEVEL is
    # set" as off, and a rule that calls every multi-rank group slow.
    _env(monkeypatch, WORLD_SIZE="4", LOCAL_WORLD_SIZE="4", **p2p)
    cluster = _Cluster(monkeypatch, {r: "nodeA" for r in range(4)})
    assert _link_is_slow((0, 1, 2, 3)) is False
    assert _link_is_slow((1, 3)) is False
    assert cluster.gathers == 2


def test_one_rank_group_is_fast_without_a_collective(monkeypatch):
    # A group of one sends to itself. Guards a gather on it (harmless but pointless) and a rule
    # that calls any group slow on a multi-node job.
    _env(monkeypatch, **LAUNCHERS["srun"])
    cluster = _Cluster(monkeypatch, NODE_MAJOR)
    assert _link_is_slow((2,)) is False
    assert cluster.gathers == 0


# -- host identity ----------------------------------------------------------------------------


def test_host_id_is_ncclhostid_else_hostname_and_boot_id(monkeypatch):
    # Guards the key the hosts are compared by: NCCL's (getHostHash). Different hostnames on one
    # machine (containers) still differ here by hostname; NCCL_HOSTID overrides both.
    monkeypatch.setattr(ctx_mod.socket, "gethostname", lambda: "nodeA")
    a = _host_id()
    assert a.startswith("nodeA")
    monkeypatch.setattr(ctx_mod.socket, "gethostname", lambda: "nodeB")
    assert _host_id() != a
    try:
        boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot_id = ""
    assert _host_id() == "nodeB" + boot_id
    monkeypatch.setenv("NCCL_HOSTID", "rack3-node7")
    assert _host_id() == "rack3-node7"


# -- CommContext --------------------------------------------------------------------------------


def test_nccl_context_resolves_the_link_once_at_construction(monkeypatch):
    # `_link_is_slow` is a collective. Resolved lazily, it would run wherever slow_link() is
    # first reached, and short-circuits (`any(c.should_overlap() ...)` in the scheduler,
    # resolve_dedup's `and`) reach it on some ranks of the group only: a hang. Guards: no
    # gather at construction, or another one at a later use.
    cluster = _Cluster(monkeypatch, NODE_MAJOR)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    comm = CommContext((0, 2), scheduler=BackwardScheduler())
    assert cluster.gathers == 1
    assert comm.slow_link() is True and comm.should_overlap() is True
    assert comm.resolved_sm_carveout() == ctx_mod.AUTO_SM_CARVEOUT
    assert cluster.gathers == 1
    fast = CommContext((0, 1), scheduler=BackwardScheduler())
    assert fast.slow_link() is False and fast.should_overlap() is False
    assert cluster.gathers == 2
