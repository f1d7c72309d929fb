"""Print the summaries of `benchmarks/probes/timeline.py` output (stdlib + fluid.testing.bench.timeline).

    python -m benchmarks.probes.timeline_summary OUT/timeline_<recipe>.json [--gaps 5]

Per variant and rank: span, host fwd/bwd, compute busy and idle, NCCL time, kernels, host time per
annotated stage, and the largest compute-stream gaps (fluid.testing.bench.timeline.summarize says how each
is computed). Idle on one rank while the same all-to-all is short on the other means that rank
arrived late (host or compute skew); idle with no collective around it means the host was too slow.
"""

from __future__ import annotations

import argparse
import json

from fluid.testing.bench.timeline import summarize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--gaps", type=int, default=5)
    args = p.parse_args()
    doc = json.load(open(args.json))
    for vname, res in doc["variants"].items():
        for rank, rows in enumerate(res.get("timeline_ranks") or []):
            s = summarize(rows, args.gaps)
            if "span_ms" not in s:
                print(f"{vname} rank {rank}: no GPU events")
                continue
            print(
                f"{vname} rank {rank}: span {s['span_ms']:.2f} ms, host fwd "
                f"{s['host_fwd_ms'] or 0:.2f} / bwd {s['host_bwd_ms'] or 0:.2f}, compute busy "
                f"{s['compute_busy_ms']:.2f}, idle {s['compute_idle_ms']:.2f}, nccl "
                f"{s['nccl_ms']:.2f}, {s['kernels']} kernels"
            )
            if s["host_stages_ms"]:
                print(
                    "    host per stage (profiled) ms: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in s["host_stages_ms"].items())
                )
            for g in s["largest_gaps"]:
                print(f"    gap {g[0]:.3f} ms at {g[1]} after {g[2]!r} before {g[3]!r}")
        if res.get("stage_times_us"):
            print(
                f"{vname} host time per stage (us per step, no profiler): {res['stage_times_us']}"
            )


if __name__ == "__main__":
    main()
