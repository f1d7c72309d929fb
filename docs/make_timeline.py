#!/usr/bin/env python3
"""Draw docs/img/timeline.png: one MoE layer's backward, per stream, scheduler off vs on.

Two lanes per panel: the compute stream (dX, dW) and the communication stream (the two backward
all-to-alls of the layer: the combine gradient, then the dispatch gradient). Off
(FLUID_SCHEDULER=0): dW runs inline after dX and the compute stream idles while each all-to-all
is in flight. On: expert dX only, then the dispatch-gradient all-to-all is launched and the expert
dW runs beside it; the combine-gradient window is filled by dW queued from the layer above
(attention linear_proj / linear_qkv, the cross-layer queue), drawn when --attn-dw-ms > 0.

Numbers, in order of preference:
  --json docs/benchmarks/raw/<run>/bench_moe.json [--config mixtral]  (the MoE layer benchmark's
      JSON before the recipe runner; docs/benchmarks/raw/h200x4_layers keeps one):
      a2a = results[config].a2a_ms (one all-to-all of the dispatch volume, alone),
      dW  = results[config].dw_ms, dX = variants.fluid_off_c1.bwd_ms - dW - 2 * a2a;
      the measured backward times (off, on) go in the title.
  --smoke docs/benchmarks/raw/smoke_gpu_tests_h200.txt: the `.SCHEDULER_GPU_JSON` line of
      tests/gpu/scheduler_overlap.py (a2a_alone_ms, window_dw_alone_ms); dX from --dx-ms.
  --a2a-ms / --dw-ms / --dx-ms alone.
Drawn with:
    python docs/make_timeline.py --json docs/benchmarks/raw/<run>/bench_moe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def from_bench_json(path: Path, config: str) -> dict:
    doc = json.loads(path.read_text())
    r = doc["results"][config]
    v = r["variants"]
    a2a, dw = r["a2a_ms"], r["dw_ms"]
    off, on = v["fluid_off_c1"]["bwd_ms"], v["fluid_on_c1"]["bwd_ms"]
    env = doc.get("env", {})
    link = "P2P disabled" if env.get("NCCL_P2P_DISABLE") not in (None, "", "0") else "NVLink"
    return dict(a2a=a2a, dw=dw, dx=max(off - dw - 2 * a2a, 0.05), measured=(off, on),
                source=f"{path} [{config}], {doc.get('card')}, {link}")


def from_smoke(path: Path, dx: float) -> dict:
    for line in path.read_text().splitlines():
        if line.startswith(".SCHEDULER_GPU_JSON"):
            j = json.loads(line.split(" ", 1)[1])
            link = "P2P disabled" if j.get("NCCL_P2P_DISABLE") == "1" else "NVLink"
            return dict(a2a=j["a2a_alone_ms"], dw=j["window_dw_alone_ms"], dx=dx, measured=None,
                        source=f"{path.name} (scheduler_overlap.py, {j['card']}, {link}); dX assumed")
    raise SystemExit(f"{path}: no .SCHEDULER_GPU_JSON line")


def schedule(a2a: float, dw: float, dx: float, attn_dw: float, on: bool):
    """Bars (lane, start, length, label, colour) of one layer's backward; returns (bars, end)."""
    C, M = "compute", "comm"
    bars, t = [], 0.0
    if not on and attn_dw > 0:  # inline, in the attention backward of the layer above
        bars.append((C, t, attn_dw, "dW attn (inline)", "tab:green"))
        t += attn_dw
    # 1. combine-gradient all-to-all (output grad back to the experts' ranks).
    bars.append((M, t, a2a, "a2a (combine grad)", "tab:orange"))
    if on and attn_dw > 0:  # dW queued by the layer above fills this window
        bars.append((C, t, attn_dw, "dW attn (queued)", "tab:green"))
    t += max(a2a, attn_dw if on else 0.0)
    # 2. experts backward: dX (critical path); dW inline when off.
    bars.append((C, t, dx, "dX experts", "tab:blue"))
    t += dx
    if not on:
        bars.append((C, t, dw, "dW experts", "tab:green"))
        t += dw
    # 3. dispatch-gradient all-to-all; on: expert dW runs in its window.
    bars.append((M, t, a2a, "a2a (dispatch grad)", "tab:orange"))
    if on:
        bars.append((C, t, dw, "dW experts", "tab:green"))
        t += max(a2a, dw)
    else:
        t += a2a
    return bars, t


def draw(nums: dict, attn_dw: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 4.2), sharex=True)
    ends = {}
    for ax, on in zip(axes, (False, True)):
        bars, end = schedule(nums["a2a"], nums["dw"], nums["dx"], attn_dw, on)
        ends[on] = end
        for lane, start, length, label, colour in bars:
            y = 1 if lane == "compute" else 0
            ax.barh(y, length, left=start, height=0.6, color=colour, edgecolor="black")
            ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=7)
        ax.set_yticks([0, 1], ["comm stream", "compute stream"])
        ax.set_ylim(-0.6, 1.6)
        ax.set_title(f"scheduler {'on' if on else 'off'}: {end:.2f} ms", fontsize=9, loc="left")
    axes[1].set_xlabel("ms")
    title = (f"One MoE layer backward: a2a {nums['a2a']:.2f} ms x2, dW {nums['dw']:.2f} ms, "
             f"dX {nums['dx']:.2f} ms; model {ends[False]:.2f} -> {ends[True]:.2f} ms")
    if nums.get("measured"):
        title += f"\nmeasured backward: off {nums['measured'][0]:.2f} ms, on {nums['measured'][1]:.2f} ms"
    fig.suptitle(title, fontsize=9)
    fig.text(0.01, 0.005, "source: " + nums["source"], fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}: off {ends[False]:.3f} ms, on {ends[True]:.3f} ms ({nums['source']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="bench_moe.json of benchmarks/bench_moe.py")
    p.add_argument("--config", default="mixtral", help="results key in the JSON (mixtral, fine)")
    p.add_argument("--smoke", type=Path, help="text output holding a .SCHEDULER_GPU_JSON line")
    p.add_argument("--a2a-ms", type=float, default=0.88, help="one backward all-to-all")
    p.add_argument("--dw-ms", type=float, default=0.69, help="expert weight gradients")
    p.add_argument("--dx-ms", type=float, default=2.0, help="expert input gradients")
    p.add_argument("--attn-dw-ms", type=float, default=0.0,
                   help="attention dW queued from the layer above (0: not drawn)")
    p.add_argument("--out", type=Path, default=HERE / "img" / "timeline.png")
    a = p.parse_args()
    if a.json:
        nums = from_bench_json(a.json, a.config)
    elif a.smoke:
        nums = from_smoke(a.smoke, a.dx_ms)
    else:
        nums = dict(a2a=a.a2a_ms, dw=a.dw_ms, dx=a.dx_ms, measured=None, source="numbers from flags")
    draw(nums, a.attn_dw_ms, a.out)


if __name__ == "__main__":
    main()
