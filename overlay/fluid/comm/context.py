"""CommContext: the process group, its communication stream, and the async handle.

One CommContext exists per process group (expert-parallel group, context-parallel group) and
model: the model's FluidRuntime creates it when the first layer using the group is built, and the
layers pass it explicitly to every all-to-all; there are no module-level streams. On CUDA the context owns a dedicated stream: an all-to-all launched through it first
makes that stream wait for the compute stream (the input is ready), runs NCCL there, and returns
a CommHandle; `handle.wait()` makes the *current* stream wait for the communication. The caller
decides where to wait, so compute can be issued in between (this is how the backward scheduler
fills the window with weight gradients).

On CPU (gloo) there is no stream: the collective is started with `async_op=True` (gloo runs it on
its own thread) and `wait()` blocks on the work object. The semantics are the same.

Event protocol on CUDA, for one all-to-all:
  1. compute stream records `ready`                 (inputs written)
  2. comm stream waits `ready`, launches NCCL, records `done`
  3. caller issues unrelated compute on the compute stream (optional)
  4. handle.wait(): compute stream waits `done`; the handle drops its tensor references, so the
     caching allocator cannot hand the input/output buffers to other work before NCCL is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fluid.comm.emulated_link import EmulatedLink
from fluid.config import OVERLAP_CHOICES


def _c_strtol(text: str) -> int:
    """C's `strtol(text, NULL, 0)`: optional leading space and sign, then the longest hex
    (0x...), octal (0...) or decimal prefix; 0 when there is none. NCCL parses its integer
    variables this way, so "1abc" reads as 1 and "true" as 0."""
    m = re.match(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if m is None:
        return 0
    sign, digits = m.groups()
    base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
    value = int(digits, base)
    return -value if sign == "-" else value


def _p2p_disabled(env) -> bool:
    """Whether NCCL's peer-to-peer transport is off for every GPU pair, read the way NCCL reads
    it (ncclGetLevel, src/graph/paths.cc): `NCCL_P2P_DISABLE` whose value parses as the integer
    1 ("1", "0x1"; not "true", "yes" or "2", which NCCL ignores), else `NCCL_P2P_LEVEL` "LOC"
    (case-sensitive) or a number that parses as 0 (the old numbering's "never")."""
    disable = env.get("NCCL_P2P_DISABLE")
    if disable is not None and _c_strtol(disable) == 1:
        return True
    level = env.get("NCCL_P2P_LEVEL")
    if level is None:
        return False
    if level == "LOC":
        return True
    return "0" <= level[:1] <= "9" and _c_strtol(level) == 0


def _host_id() -> str:
    """This host as NCCL tells hosts apart (getHostHash): `NCCL_HOSTID` if set, else the
    hostname followed by the kernel's boot id. Ranks with different ids talk through the
    network transport; containers of one machine share the boot id, machines do not."""
    host_id = os.environ.get("NCCL_HOSTID")
    if host_id is not None:
        return host_id
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return socket.gethostname() + boot_id


def _link_is_slow(group) -> bool:
    """True when the all-to-all of `group` does not run over direct GPU peer links.

    Over NVLink a Hopper all-to-all of tens of MiB takes a fraction of a millisecond, and running it
    beside a GEMM costs more (SM and memory contention) than it hides; measured in
    docs/hardware.md. Through host memory (NCCL's P2P transport off, `_p2p_disabled`: the
    multi-node stand-in) or between hosts it takes milliseconds and hides almost fully behind a
    GEMM.

    Whether the group spans hosts is asked of the group itself: every rank contributes its
    `_host_id` (one `all_gather_object` over `group`), which holds under any launcher and rank
    layout (torchrun, srun, mpirun; node-major or not). It is a collective: every rank of the
    group must call this at the same point (CommContext does at construction). P2P off
    answers without it, as it does on every rank (launchers give all ranks one environment).
    Within one host the GPUs are taken to have peer links (NVLink).
    """
    if _p2p_disabled(os.environ):
        return True
    size = dist.get_world_size(group)
    if size == 1:
        return False
    hosts = [None] * size
    dist.all_gather_object(hosts, _host_id(), group=group)
    return len(set(hosts)) > 1


# SMs left to NCCL by GEMMs beside an all-to-all over a slow link. Without a carve-out
# torch._grouped_mm hides almost none of a concurrent all-to-all (P2P off); of 0/4/8/16/24 SMs, 8
# gave the fastest MoE layer fwd+bwd or one within 0.4% of it (2x H200, P2P off;
# docs/benchmarks/HISTORY.md).
AUTO_SM_CARVEOUT = 8


@contextlib.contextmanager
def sm_carveout(n: int):
    """GEMMs launched inside leave `n` SMs free (see CommContext.beside_comm); restores on exit."""
    prev = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(n)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev)


def current_stream(device_index: Optional[int]) -> torch.cuda.Stream:
    """`torch.cuda.current_stream` for a known device index.

    With an int the lookup is one C call. Without a device, torch.cuda.current_stream (and
    Event.record() and torch.cuda.stream(), which call it) resolves the current device through
    `torch.cuda.is_available()` and the environment: 17 us per call under cProfile, 37 calls per
    MoE layer fwd+bwd, in a layer whose pace the host sets at 64 experts
    (docs/benchmarks/HISTORY.md)."""
    return torch.cuda.current_stream(device_index)


@dataclass
class CommHandle:
    """An all-to-all in flight. `wait()` once; later calls are no-ops.

    Attributes:
        nbytes: bytes this rank sends (for the scheduler's overlap policy and stats).
        tensors: input and output kept alive until the wait (see module docstring).
    """

    nbytes: int
    work: Optional[dist.Work] = None  # gloo work object
    done: Optional[torch.cuda.Event] = None  # CUDA: recorded on the comm stream
    start_event: Optional[torch.cuda.Event] = None  # CUDA timing only
    tensors: tuple = ()
    waited: bool = False
    device_index: Optional[int] = None  # CUDA: the device whose current stream waits

    def wait(self) -> None:
        if self.waited:
            return
        if self.work is not None:
            self.work.wait()
        if self.done is not None:
            current_stream(self.device_index).wait_event(self.done)
        self.tensors = ()
        self.waited = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.wait()


@dataclass(eq=False)  # identity semantics: contexts are registered in a WeakSet
class CommContext:
    """A process group plus the stream its all-to-alls run on.

    Args:
        group: the torch.distributed process group (EP or CP group). Required: FluidMoE never
            falls back to a global group.
        overlap: "auto" (overlap compute with this group's all-to-alls only where the link is slow,
            see `_link_is_slow`), "always" or "never" (`--fluid-overlap`).
        min_window_bytes: all-to-alls sending fewer bytes than this leave the dW queue alone
            (`--fluid-min-window-bytes`; None: 1 MiB on NCCL, 0 on gloo).
        sm_carveout: SMs that GEMMs issued beside this group's all-to-alls leave free for NCCL
            (`--fluid-sm-carveout`: an int >= 0, or None / "auto" = AUTO_SM_CARVEOUT where the
            link is slow (`_link_is_slow`), else 0); see `beside_comm`.
        scheduler: the BackwardScheduler that fills this group's backward windows (the model's;
            set by fluid.runtime.FluidRuntime.comm). None: `default_scheduler()`, the one of code
            without a model, so a context built by hand never changes a model's dW deferral.
        emulated_link: a group of one rank only: run its all-to-alls as over this slow link
            (`--fluid-emulate-link-gbps`, fluid.comm.emulated_link) instead of skipping them;
            the context then reports a slow link.
    `CommContext.from_fluid_config(group, fluid_config)` takes the three from a FluidConfig.
    """

    group: object
    overlap: str = "auto"
    min_window_bytes: Optional[int] = None
    sm_carveout: Optional[int | str] = None
    stream: Optional[torch.cuda.Stream] = None
    _slow_link: Optional[bool] = None
    scheduler: Optional[object] = None
    emulated_link: Optional[EmulatedLink] = None

    def __post_init__(self):
        if self.group is None:
            raise ValueError("CommContext needs an explicit process group")
        if self.overlap not in OVERLAP_CHOICES:
            raise ValueError(
                f"--fluid-overlap must be one of {', '.join(OVERLAP_CHOICES)}, not {self.overlap!r}"
            )
        mwb = self.min_window_bytes
        if mwb is not None and (isinstance(mwb, bool) or not isinstance(mwb, int) or mwb < 0):
            raise ValueError(f"--fluid-min-window-bytes must be an int >= 0, not {mwb!r}")
        if self.sm_carveout is None:
            self.sm_carveout = "auto"
        raw = self.sm_carveout
        if raw != "auto" and (isinstance(raw, bool) or not isinstance(raw, int) or raw < 0):
            raise ValueError(f"--fluid-sm-carveout must be 'auto' or an int >= 0, not {raw!r}")
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.is_nccl = dist.get_backend(self.group) == "nccl"
        if self.emulated_link is not None:
            if self.size != 1:
                raise ValueError(
                    f"--fluid-emulate-link-gbps emulates the all-to-alls of a group of one rank; "
                    f"this group has {self.size}: drop the flag (its link is real)"
                )
            if self.is_nccl:
                self._slow_link = True
                self.emulated_link.calibrate()
        if self.is_nccl and self._slow_link is None:
            # `_link_is_slow` is a collective over the group: resolved here, where every rank of
            # the group builds its contexts in the same order, not at first use, which
            # short-circuiting conditions (scheduler, dedup) reach on some ranks only.
            self._slow_link = _link_is_slow(self.group)
        if self.min_window_bytes is None:
            # A window smaller than this is not worth filling: the queued dW waits for the next
            # (larger) all-to-all. Measured: the MoE dispatcher's probs all-to-all (a few KiB)
            # comes just before the token all-to-all in backward and took the whole expert dW
            # into a 0.13 ms window, leaving the 1.76 ms token window empty. gloo: no minimum.
            self.min_window_bytes = 1 << 20 if self.is_nccl else 0
        if self.scheduler is None:  # built by hand, outside a model: never a model's scheduler
            from fluid.schedule.scheduler import default_scheduler

            self.scheduler = default_scheduler()
        self.scheduler.register_comm(self)  # its policy gates deferral (overlap_possible)

    @classmethod
    def from_fluid_config(
        cls, group, fluid_config, scheduler=None, emulate_link: bool = False
    ) -> "CommContext":
        """A context for `group` with a FluidConfig's overlap, window and carve-out settings;
        `emulate_link` (the expert-parallel group): with the config's emulated link, if set."""
        gbps = fluid_config.emulate_link_gbps if emulate_link else None
        return cls(
            group,
            overlap=fluid_config.overlap,
            min_window_bytes=fluid_config.min_window_bytes,
            sm_carveout=fluid_config.sm_carveout,
            scheduler=scheduler,
            emulated_link=EmulatedLink(gbps) if gbps is not None else None,
        )

    def comm_stream(self) -> Optional[torch.cuda.Stream]:
        if not self.is_nccl:
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def should_overlap(self) -> bool:
        """Whether compute should be issued while this group's all-to-alls are in flight.
        `measure`: what the scheduler's OverlapTrial chose for the micro-batch in flight, the
        auto policy where it has not chosen (warm-up; fluid.schedule.overlap_trial)."""
        if self.overlap == "measure":
            trial = getattr(self.scheduler, "trial", None)
            choice = trial.choice() if trial is not None else None
            if choice is not None:
                return choice
        elif self.overlap != "auto":
            return self.overlap == "always"
        if not self.is_nccl:
            return True  # gloo: the collective runs on its own thread, overlap is free
        return self.slow_link()

    def beside_comm(self):
        """Context for compute issued while one of this group's all-to-alls is in flight.

        Hopper GEMMs are persistent kernels: `torch._grouped_mm` (CUTLASS) and cuBLASLt launch
        one thread block per SM and give each block a fixed share of the tiles. Beside a running
        NCCL kernel, the blocks that find their SM taken start only when NCCL ends, and the GEMM
        ends that much later: it runs after the all-to-all instead of beside it. With
        `sm_carveout` = n > 0 the GEMMs launched inside size their grid to (SMs - n) through
        PyTorch's `torch._C._set_sm_carveout_experimental`, so every block starts at once. n = 0
        or a CPU group: no change. The previous setting is restored on exit.
        """
        n = self.resolved_sm_carveout()
        if not n or not self.is_nccl:
            return contextlib.nullcontext()
        return sm_carveout(n)

    def resolved_sm_carveout(self) -> int:
        """`sm_carveout` with "auto" resolved: AUTO_SM_CARVEOUT over a slow link, else 0."""
        if isinstance(self.sm_carveout, int):  # validated in __post_init__: an int >= 0 or "auto"
            return self.sm_carveout
        return AUTO_SM_CARVEOUT if self.slow_link() else 0

    def slow_link(self) -> bool:
        """True for an NCCL group whose all-to-alls leave the node or avoid peer links
        (`_link_is_slow`); always False for gloo."""
        if not self.is_nccl:
            return False
        if self._slow_link is None:
            self._slow_link = _link_is_slow(self.group)
        return self._slow_link

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: Optional[list[int]],
        input_splits: Optional[list[int]],
        timing: bool = False,
        ready: Optional[torch.cuda.Event] = None,
    ) -> CommHandle:
        """Start `all_to_all_single` (dim 0, uneven splits allowed) and return its handle.

        `ready`: an event recorded on the compute stream once `input` was written; by default one
        is recorded now. Launch order matters with CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware
        queue for all streams): the queue processes a collective's launch only when what it
        waits for is done (its `ready` event and the previous collective on this stream), and
        everything queued after it waits as well. So compute meant to run beside an all-to-all
        must be queued before the next collective's launch, and a collective whose input was
        ready long ago should wait on that old event, not on the compute queued since.
        """
        nbytes = input.numel() * input.element_size()
        if not self.is_nccl:
            work = dist.all_to_all_single(
                output, input, output_splits, input_splits, group=self.group, async_op=True
            )
            return CommHandle(nbytes, work=work, tensors=(input, output))
        dev = input.device.index
        compute = current_stream(dev)
        stream = self.comm_stream()
        assert stream is not None  # NCCL group
        if ready is None:
            ready = torch.cuda.Event()
            ready.record(compute)
        start = None
        stream.wait_event(ready)
        # The collective runs on the comm stream. Switched by hand rather than with
        # torch.cuda.stream(), whose enter resolves the device without an index (see
        # current_stream); the previous stream is known: `compute`.
        torch.cuda.set_stream(stream)
        try:
            if timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            # Synchronous on this stream (ProcessGroupNCCL runs it on the current stream); an
            # async_op=True launch on PG's own stream measured the same.
            if self.emulated_link is not None:
                self.emulated_link.transfer(output, input)
            else:
                dist.all_to_all_single(output, input, output_splits, input_splits, group=self.group)
            done = torch.cuda.Event(enable_timing=timing)
            done.record(stream)
        finally:
            torch.cuda.set_stream(compute)
        return CommHandle(
            nbytes, done=done, start_event=start, tensors=(input, output), device_index=dev
        )
