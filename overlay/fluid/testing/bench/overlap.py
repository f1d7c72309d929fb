"""How much communication a run hid, in milliseconds and as a fraction that cannot exceed 1.

Two measures (docs/benchmarks/README.md states them with every number):

1. Per window, from the BackwardScheduler's CUDA events (`get_stats()` with timing on). For an
   all-to-all whose window was filled with dW, the compute stream waits from the end of the dW to
   the end of the wait: `window_ms - dw_in_window_ms` summed over those windows (events on one
   stream, so >= 0). For an all-to-all that was not filled, the compute stream waits for all of it:
   `a2a_ms - overlapped_a2a_ms`. Their sum is the exposed communication; hidden = a2a_ms - exposed.
   hidden / a2a_ms <= 1 by construction, 0 when no window was filled, < 0 when the compute stream
   waited longer than the all-to-alls took (overlap slowed them down more than it hid).

2. Per step, from whole-step times over a slow link against NVLink (same variant): the exposed
   communication of a variant is E = T(slow) - T(NVLink), floored at 0 (a slow link cannot make a
   step faster; a negative difference is noise). hidden fraction = 1 - E(Fluid, overlap on) /
   E(Fluid, overlap off): <= 1 by construction, 0 when overlap changed nothing, < 0 when overlap
   cost more than it hid. Its noise band comes from the relative stock-vs-stock spread r of each
   link's job: every T moves by up to r*T, and the band is the fraction's range over those moves.
   This also counts what overlap costs the compute (GEMMs slowed by NCCL beside them), which
   measure 1 cannot see.
"""

from __future__ import annotations

from typing import Optional

from fluid.schedule.scheduler import exposed_a2a_ms


def window_comm(stats: dict, steps: int) -> Optional[dict]:
    """Measure 1 from scheduler stats gathered over `steps` steps (None without timings)."""
    a2a = stats.get("a2a_ms")
    if a2a is None or steps <= 0:
        return None
    exposed = exposed_a2a_ms(
        a2a,
        stats.get("overlapped_a2a_ms") or 0.0,
        stats.get("window_ms") or 0.0,
        stats.get("dw_in_window_ms") or 0.0,
    )
    hidden = a2a - exposed
    calls = stats.get("a2a_calls") or 0
    return {
        "a2a_ms_per_step": a2a / steps,
        "hidden_ms_per_step": hidden / steps,
        "exposed_ms_per_step": exposed / steps,
        "windows_per_step": calls / steps,
        "filled_windows_per_step": (stats.get("overlapped_windows") or 0) / steps,
        "hidden_ms_per_window": hidden / calls if calls else None,
        "exposed_ms_per_window": exposed / calls if calls else None,
        "hidden_fraction": hidden / a2a if a2a > 0 else None,
    }


def relative_noise(ratio_spread: dict) -> Optional[float]:
    """The largest |ratio - 1| of a stock-vs-stock spread {median, min, max}."""
    lo, hi = ratio_spread.get("min"), ratio_spread.get("max")
    if lo is None or hi is None:
        return None
    return max(abs(lo - 1.0), abs(hi - 1.0))


def link_hidden_fraction(
    on_slow: float,
    on_nv: float,
    off_slow: float,
    off_nv: float,
    noise_slow: float = 0.0,
    noise_nv: float = 0.0,
) -> dict:
    """Measure 2 for one slow link: {value, low, high, exposed_on_ms, exposed_off_ms}. `value` is
    None when Fluid with overlap off exposes no communication (nothing to hide); `low` is None
    when the noise could make it so."""
    e_on = max(on_slow - on_nv, 0.0)
    e_off = max(off_slow - off_nv, 0.0)
    d_on = noise_slow * on_slow + noise_nv * on_nv
    d_off = noise_slow * off_slow + noise_nv * off_nv
    out = {"exposed_on_ms": e_on, "exposed_off_ms": e_off, "value": None, "low": None, "high": None}
    if e_off <= 0:
        return out
    out["value"] = 1.0 - e_on / e_off
    out["high"] = 1.0 - max(e_on - d_on, 0.0) / (e_off + d_off)
    if e_off - d_off > 0:
        out["low"] = 1.0 - (e_on + d_on) / (e_off - d_off)
    return out
