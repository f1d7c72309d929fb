"""FluidConfig: the FluidMoE settings, read once from the model's TransformerConfig.

Every FluidMoE knob is a TransformerConfig field (patch 0001), so Megatron makes it a
`pretrain_gpt.py` flag: it is listed in `--help`, printed in the training log's argument dump and
saved with a checkpoint's args.

    field                    flag                                 default
    fluid_scheduler          --no-fluid-scheduler                 on: dW deferred into all-to-alls
    fluid_scheduler_timing   --fluid-scheduler-timing             off
    fluid_overlap            --fluid-overlap {auto,always,never,measure}  auto: where the link
                                                                  is slow; measure: timed
    fluid_min_window_bytes   --fluid-min-window-bytes N           1 MiB on NCCL, 0 on gloo
    fluid_sm_carveout        --fluid-sm-carveout N                auto: 8 over a slow link, else 0
    fluid_moe_chunks         --fluid-moe-chunks N                 1 (no forward pipelining)
    fluid_moe_dedup          --fluid-moe-dedup {auto,on,off}      auto
    fluid_grouped_gemm       --fluid-grouped-gemm {auto,on,off}   auto
    fluid_wgrad_accumulation --fluid-wgrad-accumulation {auto,fused,unfused}  auto (fused into an
                                                                  fp32 main_grad; see README)
    fluid_torch_adam         --fluid-torch-adam {auto,fused,foreach}  auto (fused where every
                                                                  parameter is on CUDA; only
                                                                  without TE or apex)
    fluid_emulate_link_gbps  --fluid-emulate-link-gbps G          unset; EP = 1 only: run the
                                                                  expert all-to-alls as over a
                                                                  G GB/s link (testing aid,
                                                                  fluid.comm.emulated_link)

`FluidConfig.from_config(config)` checks every value (FluidConfigError naming the flag) and returns
a frozen copy; the Fluid layers read their settings from it and from nowhere else. FluidMoE reads
no environment variables: a `FLUID_*` variable (how older versions were configured) is reported
with the flag that replaces it, and otherwise ignored, so a run is determined by its command line.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

OVERLAP_CHOICES = ("auto", "always", "never", "measure")
SWITCH_CHOICES = ("auto", "on", "off")
WGRAD_ACCUMULATION_CHOICES = ("auto", "fused", "unfused")
TORCH_ADAM_CHOICES = ("auto", "fused", "foreach")

# FluidConfig field -> (TransformerConfig field, command-line flag as --help lists it).
FIELDS = {
    "scheduler": ("fluid_scheduler", "--no-fluid-scheduler"),
    "scheduler_timing": ("fluid_scheduler_timing", "--fluid-scheduler-timing"),
    "overlap": ("fluid_overlap", "--fluid-overlap"),
    "min_window_bytes": ("fluid_min_window_bytes", "--fluid-min-window-bytes"),
    "sm_carveout": ("fluid_sm_carveout", "--fluid-sm-carveout"),
    "moe_chunks": ("fluid_moe_chunks", "--fluid-moe-chunks"),
    "moe_dedup": ("fluid_moe_dedup", "--fluid-moe-dedup"),
    "grouped_gemm": ("fluid_grouped_gemm", "--fluid-grouped-gemm"),
    "wgrad_accumulation": ("fluid_wgrad_accumulation", "--fluid-wgrad-accumulation"),
    "torch_adam": ("fluid_torch_adam", "--fluid-torch-adam"),
    "emulate_link_gbps": ("fluid_emulate_link_gbps", "--fluid-emulate-link-gbps"),
}

# Environment variables of older versions -> the flag that replaced each.
RETIRED_ENV = {
    "FLUID_SCHEDULER": "--no-fluid-scheduler",
    "FLUID_SCHEDULER_TIMING": "--fluid-scheduler-timing",
    "FLUID_OVERLAP": "--fluid-overlap",
    "FLUID_MIN_WINDOW_BYTES": "--fluid-min-window-bytes",
    "FLUID_SM_CARVEOUT": "--fluid-sm-carveout",
    "FLUID_MOE_CHUNKS": "--fluid-moe-chunks",
    "FLUID_MOE_DEDUP": "--fluid-moe-dedup",
    "FLUID_GROUPED_MM": "--fluid-grouped-gemm",
}


class FluidConfigError(ValueError):
    """A configuration FluidMoE cannot run; the message names the flag to change."""


def flag(name: str) -> str:
    """The command-line flag of FluidConfig field `name` (for messages)."""
    return FIELDS[name][1]


@dataclasses.dataclass(frozen=True)
class FluidConfig:
    """Resolved FluidMoE settings (field docs: patch 0001's TransformerConfig fields).

    `min_window_bytes` None: 1 MiB on NCCL, 0 on gloo (CommContext resolves it per group);
    `sm_carveout` None: auto (CommContext.resolved_sm_carveout)."""

    scheduler: bool = True
    scheduler_timing: bool = False
    overlap: str = "auto"
    min_window_bytes: Optional[int] = None
    sm_carveout: Optional[int] = None
    moe_chunks: int = 1
    moe_dedup: str = "auto"
    grouped_gemm: str = "auto"
    wgrad_accumulation: str = "auto"
    torch_adam: str = "auto"
    emulate_link_gbps: Optional[float] = None

    def __post_init__(self):
        def bad(name, value, want):
            raise FluidConfigError(f"{flag(name)} ({FIELDS[name][0]}): {want}, got {value!r}")

        for name in ("scheduler", "scheduler_timing"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "expected a bool")
        if self.overlap not in OVERLAP_CHOICES:
            bad("overlap", self.overlap, "expected one of " + ", ".join(OVERLAP_CHOICES))
        for name in ("moe_dedup", "grouped_gemm"):
            if getattr(self, name) not in SWITCH_CHOICES:
                bad(name, getattr(self, name), "expected one of " + ", ".join(SWITCH_CHOICES))
        if self.wgrad_accumulation not in WGRAD_ACCUMULATION_CHOICES:
            want = "expected one of " + ", ".join(WGRAD_ACCUMULATION_CHOICES)
            bad("wgrad_accumulation", self.wgrad_accumulation, want)
        if self.torch_adam not in TORCH_ADAM_CHOICES:
            bad("torch_adam", self.torch_adam, "expected one of " + ", ".join(TORCH_ADAM_CHOICES))
        gbps = self.emulate_link_gbps
        if gbps is not None and (
            isinstance(gbps, bool) or not isinstance(gbps, (int, float)) or not gbps > 0
        ):
            bad("emulate_link_gbps", gbps, "expected a number > 0 (or unset: no emulation)")
        for name, low in (("min_window_bytes", 0), ("sm_carveout", 0), ("moe_chunks", 1)):
            value = getattr(self, name)
            if value is None and name != "moe_chunks":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                unset = " (or unset: auto)" if low == 0 else ""
                bad(name, value, f"expected an int >= {low}{unset}")

    @classmethod
    def from_config(cls, config) -> "FluidConfig":
        """The FluidConfig of a TransformerConfig (fields missing on `config` take the defaults)."""
        warn_retired_env()
        defaults = cls()
        return cls(
            **{
                name: getattr(config, cfg_field, getattr(defaults, name))
                for name, (cfg_field, _) in FIELDS.items()
            }
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def warn_retired_env(environ=None) -> list[str]:
    """Warn about each FLUID_* variable set in the environment: FluidMoE does not read them.
    Returns their names."""
    environ = os.environ if environ is None else environ
    found = [name for name in RETIRED_ENV if environ.get(name, "") != ""]
    for name in found:
        warnings.warn(
            f"FluidMoE ignores the environment variable {name}: set {RETIRED_ENV[name]} "
            f"(TransformerConfig.{FIELDS_BY_FLAG[RETIRED_ENV[name]]}) instead",
            stacklevel=3,
        )
    return found


FIELDS_BY_FLAG = {fl: cfg_field for cfg_field, fl in FIELDS.values()}
