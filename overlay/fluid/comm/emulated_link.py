"""EmulatedLink: a slow expert-parallel all-to-all on one GPU, to develop and time the overlap there.

`--fluid-emulate-link-gbps G` (FluidConfig.emulate_link_gbps; expert-parallel size 1 only) runs
every all-to-all of the MoE layers' expert-parallel group, which at EP = 1 is skipped, through
the group's CommContext as if that group spanned a slow link: on the communication stream, after
the usual `ready` wait, a device copy of the same bytes (at EP = 1 the all-to-all is the
identity, so results are those of EP = 1 bit for bit), then a wait as long as the transfer would
take at EP = 2 with uniform routing, where half of the bytes leave the GPU:

    t = nbytes / 2 / (G * 1e9) seconds.

Everything else runs as over a real slow link: the context reports a slow link
(`CommContext.slow_link`), so the auto overlap policy defers dW into the backward windows, GEMMs
beside an all-to-all take the slow link's SM carve-out, and the forward waits for the dispatch and
combine as it would for NCCL.

Why: hosts with two GPUs are not always lent; on one GPU this times what the scheduler hides
(Fluid with overlap on against off, `--fluid-overlap measure`'s decision) on a step that is not
host-bound. What it leaves out, so a hidden fraction measured with it is an upper bound of what a
real link gives:
  - NCCL's kernels hold SMs (one block per channel) and memory bandwidth for the whole transfer;
    here one thread block spins (`torch.cuda._sleep`) and the copy runs at device-memory speed;
  - there is no other rank, so no skew between ranks reaching the same collective (what made
    Megatron's combined 1F1B lose at EP = 2, docs/benchmarks/overlap.md).
The MoE layer keeps the EP > 1 forward's one wait for split sizes per layer (the dispatcher takes
its EP > 1 plan over an emulated link), so chunked and plain forwards compare as at EP > 1.
On a CPU group (gloo) the emulated all-to-all is gloo's own one-rank all-to-all, without a wait:
the CPU tests check that the layers take the all-to-all path (windows, deferred dW) with the same
numbers.
"""

from __future__ import annotations

from typing import Optional

import torch

# Leaving the GPU at EP = 2 with uniform routing: every rank keeps 1/P of what it sends.
REMOTE_SHARE = 0.5
# Spin length of the clock calibration: long enough that launch latency (a few us) is < 1%.
_CALIBRATION_CYCLES = 20_000_000


class EmulatedLink:
    """The time model and the device work of one emulated all-to-all (see the module docstring).

    Args:
        gbps: the emulated link's all-to-all bus bandwidth, GB/s (> 0).
    """

    def __init__(self, gbps: float):
        if isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not gbps > 0:
            raise ValueError(f"--fluid-emulate-link-gbps must be a number > 0, not {gbps!r}")
        self.gbps = float(gbps)
        self._cycles_per_s: Optional[float] = None

    def seconds(self, nbytes: int) -> float:
        """Transfer time of an all-to-all sending `nbytes` from this GPU (the module's `t`)."""
        return nbytes * REMOTE_SHARE / (self.gbps * 1e9)

    def calibrate(self) -> float:
        """Measure the clock rate `torch.cuda._sleep` counts in (SM clock cycles per second,
        which the GPU sets), once. It synchronizes the device before and after, so the spin runs
        alone; CommContext calls it when it is built (model build time)."""
        if self._cycles_per_s is None:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)  # load the kernel outside the timed spin
            start.record()
            torch.cuda._sleep(_CALIBRATION_CYCLES)
            end.record()
            end.synchronize()
            self._cycles_per_s = _CALIBRATION_CYCLES / (start.elapsed_time(end) / 1e3)
        return self._cycles_per_s

    def transfer(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """On the current stream (the context's communication stream): `output <- input`, then
        a spin of `seconds(nbytes)` (`calibrate` first, if it has not run)."""
        output.copy_(input)
        nbytes = input.numel() * input.element_size()
        cycles = int(self.seconds(nbytes) * self.calibrate())
        if cycles > 0:
            torch.cuda._sleep(cycles)

    def __repr__(self) -> str:
        return f"EmulatedLink({self.gbps:g} GB/s)"
