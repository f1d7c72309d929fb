"""Time breakdown of one training iteration from a PyTorch profiler Chrome trace (stdlib only).

Input: the JSON `torch.profiler` exports (`export_chrome_trace`, also `.json.gz`): `traceEvents`
with `ph: "X"` ranges; GPU work has `cat` "kernel", "gpu_memcpy" or "gpu_memset" and `args.stream`;
host work has `cat` "cpu_op", "user_annotation", "python_function" or "cuda_runtime" on host
threads; a kernel and the runtime call that launched it share `args.correlation`; a forward op and
the backward node it created are linked by a `fwdbwd` flow (`ph` "s" at the forward op, "f" at the
backward node, same `id`).

The iteration: the host range of the `ProfilerStep#N` annotation (`torch.profiler` puts one around
each `prof.step()` interval; Megatron calls `prof.step()` once per iteration) extended to the end
of the last GPU event launched inside it. Every GPU interval is clipped to that window.

Each GPU event gets one category by the first matching rule of `categorize` (in this order):
  1. NCCL kernels (`nccl` in the name): `nccl_all_to_all` (SendRecv, AllToAll: NCCL runs an
     all-to-all as grouped send/recv) or `nccl_reduce` (AllReduce, ReduceScatter, AllGather,
     Broadcast, Reduce); an emulated link's wait (`spin_kernel`, torch.cuda._sleep; see
     fluid.comm.emulated_link) is an all-to-all too; memcpy / memset by `cat`.
  2. `attention`: kernel names of fused attention (flash, fmha, cudnn, efficient_attention, sdpa),
     or any kernel launched inside an attention scope (`ATTN_SCOPE`: Megatron's unfused
     `DotProductAttention` with its baddbmm/softmax/bmm, FluidCoreAttention, the SDPA op).
  3. `expert_gemm`: grouped-GEMM kernel names (`grouped`), or a GEMM kernel (`GEMM_NAME`)
     launched inside an expert scope (`EXPERT_SCOPE`: SequentialMLP, FluidGroupedMLP,
     SharedExpertMLP, ... the routed and the shared experts). A kernel name alone cannot tell an
     expert GEMM from a dense GEMM; the scope can.
  4. `optimizer`: multi_tensor_apply / adam kernels, or anything inside `Optimizer.step` /
     Megatron's optimizer (`OPT_SCOPE`).
  5. `router_permute`: any non-GEMM kernel inside the MoE layer (`MOE_SCOPE`) but outside the
     experts: router (top-k, softmax, aux loss), dispatcher (histc, cumsum, sort, index, scatter/
     gather, permute/unpermute); without scopes, top-k/histc/cumsum/radix-sort kernel names.
  6. `gemm_other`: the other GEMM kernels (nvjet, cublas, xmma, cutlass, gemm): projections,
     logits, the router GEMM.
  7. `norm_elementwise`: element-wise, reductions, norms, copies, concatenations, triton kernels.
  8. `other`.
A kernel's scope is the names of the host ranges enclosing the runtime call that launched it (its
`correlation`), and for a launch inside a backward node, also the ranges enclosing the forward op
that created the node (the `fwdbwd` flow). Module names reach the trace as `nn.Module: <Class>`
ranges: with `with_stack=True`, or from the forward hooks of `module_scope_hooks`.

Outputs (`breakdown`), all in ms over the window:
  - `wall_ms`; `streams`: per GPU stream, busy time (union of its intervals) and kernel count;
  - `exclusive_ms`: the window split so that the parts add up to `wall_ms`: at each instant, the
    category of the compute kernel running (compute = every kernel that is not NCCL, memcpy or
    memset; the compute stream's, i.e. the stream with the most compute time, where two overlap);
    else `exposed_all_to_all` / `exposed_reduce` where only NCCL runs; else `memcpy_memset`; else
    `host_gap` (the GPU runs nothing: the host has not launched the next kernel);
  - `kernel_ms`: summed kernel durations per category over all streams (overlap counted twice),
    with `hidden_*` = NCCL time that ran under compute;
  - `fractions`: `exclusive_ms / wall_ms`;
  - `host_gaps`: how many idle stretches, the largest (ms after the window's start, length);
    `top_kernels`: per category, the kernel names with the most summed time (ms, count).
`markdown` renders one or more breakdowns (stock, Fluid) side by side. `host_pace` sets each
module's host time beside the GPU time it launched, with the host's waits for the device.
"""

from __future__ import annotations

import gzip
import json
import re
from bisect import bisect_left, bisect_right
from pathlib import Path

from fluid.testing.bench.timeline import union_length

ATTN_NAME = re.compile(r"flash|fmha|cudnn.*(attn|attention|sdpa)|efficient_attention|sdpa", re.I)
ATTN_SCOPE = re.compile(
    r"DotProductAttention|CoreAttention|scaled_dot_product|flash_attention|efficient_attention|"
    r"cudnn_attention|FusedScaleMaskSoftmax",
    re.I,
)
EXPERT_SCOPE = re.compile(r"expert|GroupedMLP|SequentialMLP|GroupedLinear|grouped_mm|gmm_", re.I)
MOE_SCOPE = re.compile(r"MoELayer|Router|TokenDispatcher|moe_utils|permute", re.I)
OPT_SCOPE = re.compile(r"Optimizer\.step|optimizer|clip_grad", re.I)
GROUPED_NAME = re.compile(r"grouped", re.I)
GEMM_NAME = re.compile(r"gemm|nvjet|cublas|xmma|cutlass|sm90_|sm80_|ampere_|hopper_", re.I)
OPT_NAME = re.compile(r"multi_tensor_apply|adam", re.I)
ROUTER_NAME = re.compile(r"topk|histc|histogram|cumsum|radix|sort", re.I)
A2A_NAME = re.compile(r"SendRecv|AllToAll|Send|Recv", re.I)

CATEGORIES = (
    "attention",
    "expert_gemm",
    "gemm_other",
    "router_permute",
    "norm_elementwise",
    "optimizer",
    "other",
    "nccl_all_to_all",
    "nccl_reduce",
    "memcpy_memset",
)
COMPUTE = CATEGORIES[:7]
EXCLUSIVE = COMPUTE + ("exposed_all_to_all", "exposed_reduce", "memcpy_memset", "host_gap")
_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_HOST_CATS = ("cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver")
_STEP = re.compile(r"ProfilerStep#(\d+)$")


def load(path) -> dict:
    """A Chrome trace (`.json` or `.json.gz`)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt") as f:
        return json.load(f)


def categorize(name: str, cat: str, scope: tuple = ()) -> str:
    """The category of one GPU event (rules in the module docstring); `scope`: the names of the
    host ranges around its launch."""
    if cat == "gpu_memcpy" or cat == "gpu_memset":
        return "memcpy_memset"
    if "nccl" in name.lower():
        return "nccl_all_to_all" if A2A_NAME.search(name) else "nccl_reduce"
    if "spin_kernel" in name:  # the emulated link's transfer time
        return "nccl_all_to_all"
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "memcpy_memset"
    in_ = lambda rx: any(rx.search(s) for s in scope)  # noqa: E731
    if ATTN_NAME.search(name) or in_(ATTN_SCOPE):
        return "attention"
    gemm = bool(GEMM_NAME.search(name))
    if GROUPED_NAME.search(name) or (gemm and in_(EXPERT_SCOPE)):
        return "expert_gemm"
    if OPT_NAME.search(name) or in_(OPT_SCOPE):
        return "optimizer"
    if not gemm and in_(MOE_SCOPE) and not in_(EXPERT_SCOPE):
        return "router_permute"
    if not gemm and not scope and ROUTER_NAME.search(name):
        return "router_permute"
    if gemm:
        return "gemm_other"
    return "norm_elementwise" if _is_elementwise(name) else "other"


_ELEMENTWISE = re.compile(
    r"elementwise|reduce|norm|triton|vectorized|unrolled|softmax|copy|fill|cat|index|gather|"
    r"scatter|silu|gelu|swiglu|rope|rotary|cross_entropy|loss|where|pow|sqrt|mul|add|_kernel",
    re.I,
)


def _is_elementwise(name: str) -> bool:
    return bool(_ELEMENTWISE.search(name))


def _scopes(events: list, queries: dict) -> dict:
    """For each query {key: (tid, ts)}: the host ranges (name, (tid, ts)) enclosing ts on tid,
    outermost first."""
    by_tid: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _HOST_CATS and e.get("cat") != "cuda_runtime":
            by_tid.setdefault(e.get("tid"), []).append(
                (float(e["ts"]), -float(e.get("dur", 0.0)), e["name"])
            )
    q_by_tid: dict = {}
    for k, (tid, ts) in queries.items():
        q_by_tid.setdefault(tid, []).append((ts, k))
    out = {}
    for tid, qs in q_by_tid.items():
        rs = sorted(by_tid.get(tid, []))
        qs.sort()
        stack: list = []  # (end, name, key)
        i = 0
        for ts, k in qs:
            while i < len(rs) and rs[i][0] <= ts:
                s, negd, name = rs[i]
                while stack and stack[-1][0] < s:
                    stack.pop()
                stack.append((s - negd, name, (tid, s)))
                i += 1
            while stack and stack[-1][0] < ts:
                stack.pop()
            out[k] = [(name, key) for end, name, key in stack if end >= ts]
    return out


def _step_range(events: list, step):
    """(number, start, end) of the ProfilerStep annotation `step` (default: the last one)."""
    steps = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            m = _STEP.match(e.get("name", ""))
            if m:
                steps.append((int(m.group(1)), float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    if not steps:
        return None
    if step is None:
        return max(steps)
    for s in steps:
        if s[0] == step:
            return s
    raise ValueError(f"no ProfilerStep#{step} in the trace (has {sorted(s[0] for s in steps)})")


def gpu_events(trace: dict, step=None) -> tuple:
    """The iteration window and its GPU events: ((t0, t1, step number or None),
    [(start, end, stream, name, category)]) in microseconds, clipped to the window."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in _GPU_CATS]
    launches = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            c = e.get("args", {}).get("correlation")
            if c is not None:
                launches[c] = (e.get("tid"), float(e["ts"]))
    rng = _step_range(events, step)
    # scope queries: each GPU event's launch, each forward op of a fwd->bwd flow
    queries = {}
    for i, e in enumerate(gpu):
        c = e.get("args", {}).get("correlation")
        if c in launches:
            queries[("k", i)] = launches[c]
    flows_f: dict = {}
    flows_s: dict = {}
    for e in events:
        if e.get("cat") == "fwdbwd" and e.get("ph") in ("s", "f"):
            (flows_s if e["ph"] == "s" else flows_f)[e["id"]] = (e.get("tid"), float(e["ts"]))
    for fid, at in flows_s.items():
        if fid in flows_f:
            queries[("f", fid)] = at
    scopes = _scopes(events, queries)
    fwd_of_bwd = {flows_f[fid]: [n for n, _ in scopes.get(("f", fid), [])] for fid in flows_f}

    def scope_names(i):
        names = []
        for name, key in scopes.get(("k", i), []):
            names.append(name)
            names += fwd_of_bwd.get(key, [])
        return tuple(names)

    if rng is not None:
        _, t0, host_end = rng
        inside = [
            i
            for i, e in enumerate(gpu)
            if ("k", i) in queries and t0 <= queries[("k", i)][1] <= host_end
        ]
        t1 = max([host_end] + [float(gpu[i]["ts"]) + float(gpu[i]["dur"]) for i in inside])
    else:
        t0 = min(float(e["ts"]) for e in gpu)
        t1 = max(float(e["ts"]) + float(e["dur"]) for e in gpu)
    out = []
    for i, e in enumerate(gpu):
        s, en = max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1)
        if en <= s:
            continue
        stream = e.get("args", {}).get("stream", e.get("tid"))
        out.append((s, en, stream, e["name"], categorize(e["name"], e["cat"], scope_names(i))))
    return (t0, t1, rng[0] if rng else None), out


def breakdown(trace, step=None, top: int = 5) -> dict:
    """The numbers of one iteration (see the module docstring). `trace`: a loaded trace or a
    path; `top`: how many of the largest host gaps, and of the kernels of each category (by
    summed time), to list."""
    if not isinstance(trace, dict | list):
        trace = load(trace)
    (t0, t1, n), evs = gpu_events(trace, step)
    wall = t1 - t0
    streams: dict = {}
    for s, e, st, _, c in evs:
        streams.setdefault(st, []).append((s, e, c))
    compute_time = {st: sum(e - s for s, e, c in v if c in COMPUTE) for st, v in streams.items()}
    compute_stream = max(compute_time, key=lambda st: compute_time[st]) if compute_time else None
    kernel = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict = {}
    for s, e, _, name, c in evs:
        kernel[c] += e - s
        t = by_name.setdefault((c, name), [0.0, 0])
        t[0] += e - s
        t[1] += 1
    # sweep over elementary segments
    excl = dict.fromkeys(EXCLUSIVE, 0.0)
    bounds = sorted({t0, t1, *(s for s, *_ in evs), *(e for _, e, *_ in evs)})
    starts = sorted(range(len(evs)), key=lambda i: evs[i][0])
    active: dict = {}
    j = 0
    hidden = {"nccl_all_to_all": 0.0, "nccl_reduce": 0.0}
    gaps: list = []  # [start, length] of each idle stretch
    for a, b in zip(bounds, bounds[1:], strict=False):
        while j < len(starts) and evs[starts[j]][0] <= a:
            active[starts[j]] = evs[starts[j]]
            j += 1
        for i in [i for i, ev in active.items() if ev[1] <= a]:
            del active[i]
        d = b - a
        comp = [ev for ev in active.values() if ev[4] in COMPUTE]
        nccl = {ev[4] for ev in active.values() if ev[4].startswith("nccl")}
        if comp:
            main = [ev for ev in comp if ev[2] == compute_stream] or comp
            excl[min(main)[4]] += d
            for c in nccl:
                hidden[c] += d
        elif nccl:
            excl["exposed_all_to_all" if "nccl_all_to_all" in nccl else "exposed_reduce"] += d
        elif active:
            excl["memcpy_memset"] += d
        else:
            excl["host_gap"] += d
            if gaps and gaps[-1][0] + gaps[-1][1] == a:
                gaps[-1][1] += d
            else:
                gaps.append([a, d])
    ms = lambda x: round(x / 1e3, 4)  # noqa: E731
    return {
        "step": n,
        "wall_ms": ms(wall),
        "compute_stream": compute_stream,
        "streams": {
            str(st): {"busy_ms": ms(union_length([(s, e) for s, e, _ in v])), "events": len(v)}
            for st, v in sorted(streams.items(), key=lambda kv: str(kv[0]))
        },
        "exclusive_ms": {k: ms(v) for k, v in excl.items()},
        "fractions": {k: round(v / wall, 4) if wall else 0.0 for k, v in excl.items()},
        "kernel_ms": {k: ms(v) for k, v in kernel.items()},
        "hidden_ms": {
            "all_to_all": ms(hidden["nccl_all_to_all"]),
            "reduce": ms(hidden["nccl_reduce"]),
        },
        "host_gaps": {
            "count": len(gaps),
            "largest": [
                {"at_ms": ms(g[0] - t0), "ms": ms(g[1])}
                for g in sorted(gaps, key=lambda g: -g[1])[:top]
            ],
        },
        "top_kernels": {
            c: [
                {"name": name[:120], "ms": ms(v[0]), "count": v[1]}
                for (cc, name), v in sorted(by_name.items(), key=lambda kv: -kv[1][0])
                if cc == c
            ][:top]
            for c in CATEGORIES
        },
    }


def all_to_all_spans(trace, step=None) -> list:
    """[(start, end)] in microseconds on the host clock of every all-to-all kernel (`nccl_all_to_all`)
    that starts inside the iteration window, in start order. Kernels carried over from the previous
    iteration (clipped at the window's start) are left out, so every rank lists the same
    collectives. `baseTimeNanoseconds` (newer Kineto traces write times relative to it) is added
    back so that two ranks' traces of one host share a time base."""
    if not isinstance(trace, dict | list):
        trace = load(trace)
    (t0, _, _), evs = gpu_events(trace, step)
    base = float(trace.get("baseTimeNanoseconds", 0)) / 1e3 if isinstance(trace, dict) else 0.0
    return sorted(
        (s + base, e + base) for s, e, _, _, c in evs if c == "nccl_all_to_all" and s > t0
    )


def peer_wait(spans: dict, top: int = 3) -> dict:
    """How much of each rank's all-to-all kernel time is waiting for the other ranks.

    `spans`: {rank: all_to_all_spans(...)} of one iteration on every rank of the group, traces of
    one host (one clock). The k-th all-to-all of each rank is taken to be the same collective (NCCL
    runs a communicator's collectives in issue order on every rank; with several communicators
    whose all-to-alls overlap in time this pairing is approximate). A collective moves data only
    once the last rank has started it, so for rank r and collective k:
        wait = max over ranks of start_k - start_k(r)   (r's kernel spinning for the others)
        rest = end_k(r) - max start_k                   (the transfer, and r's own finish)
    Returns per rank the summed kernel, wait and rest ms and the `top` largest waits; or
    {"matched": False, "counts": ...} when the ranks list different numbers of all-to-alls."""
    counts = {str(r): len(v) for r, v in spans.items()}
    if len(set(counts.values())) != 1 or not spans:
        return {"matched": False, "counts": counts}
    n = next(iter(counts.values()))
    last = [max(v[k][0] for v in spans.values()) for k in range(n)]
    out: dict = {"matched": True, "count": n, "ranks": {}}
    for r, v in sorted(spans.items()):
        waits = [(last[k] - v[k][0], k) for k in range(n)]
        out["ranks"][str(r)] = {
            "kernel_ms": round(sum(e - s for s, e in v) / 1e3, 4),
            "wait_ms": round(sum(w for w, _ in waits) / 1e3, 4),
            "rest_ms": round(sum(max(v[k][1] - last[k], 0.0) for k in range(n)) / 1e3, 4),
            "largest_waits": [
                {"index": k, "ms": round(w / 1e3, 4)} for w, k in sorted(waits, reverse=True)[:top]
            ],
        }
    return out


# Runtime calls that block the host until the device reaches a point (a `.item()`, a `.tolist()`
# or a `non_blocking=False` copy to the host synchronize the stream; an event's `synchronize()`).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
_MODULE = "nn.Module: "


def host_pace(trace, step=None) -> dict:
    """Who sets the pace, module by module: the host's time in each module's forward against the
    GPU time of the kernels it launched, and the host's waits for the device.

    For every `nn.Module: <Class>` range (module_scope_hooks) inside the iteration window, per
    class: calls, `host_ms` (summed range durations), `gpu_ms` and `kernels` (summed durations and
    count of the GPU events whose launch, by `correlation`, lies inside the range on the same
    thread), `syncs` and `sync_ms` (SYNC_CALLS inside the range: count, summed duration = the host
    waiting). Host ms well above GPU ms means the GPU idles through that module unless the host
    is far enough ahead, and a sync inside it takes that lead away (the queue drains). Also
    `syncs_outside_modules` (count, ms) for the rest of the window (loss checks, logging, the
    optimizer). Nested classes are each counted (a TransformerLayer's time includes its MoE
    layer's). Times in ms."""
    if not isinstance(trace, dict | list):
        trace = load(trace)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    rng = _step_range(events, step)
    lo, hi = (rng[1], rng[2]) if rng else (float("-inf"), float("inf"))
    gpu = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in _GPU_CATS:
            c = e.get("args", {}).get("correlation")
            if c is not None:
                gpu[c] = float(e.get("dur", 0.0))
    calls_by_tid: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            ts = float(e["ts"])
            if lo <= ts <= hi:
                calls_by_tid.setdefault(e.get("tid"), []).append(e)
    for v in calls_by_tid.values():
        v.sort(key=lambda e: float(e["ts"]))
    starts = {t: [float(e["ts"]) for e in v] for t, v in calls_by_tid.items()}
    modules: dict = {}
    inside_any: set = set()
    for m in events:
        if not (
            m.get("ph") == "X"
            and m.get("cat") == "user_annotation"  # not the GPU-side copy of the range
            and str(m.get("name", "")).startswith(_MODULE)
        ):
            continue
        m0, m1 = float(m["ts"]), float(m["ts"]) + float(m.get("dur", 0.0))
        if not lo <= m0 <= hi:
            continue
        v, st = calls_by_tid.get(m.get("tid"), []), starts.get(m.get("tid"), [])
        row = modules.setdefault(
            m["name"][len(_MODULE) :],
            {"calls": 0, "host_ms": 0.0, "gpu_ms": 0.0, "kernels": 0, "syncs": 0, "sync_ms": 0.0},
        )
        row["calls"] += 1
        row["host_ms"] += (m1 - m0) / 1e3
        for e in v[bisect_left(st, m0) : bisect_right(st, m1)]:
            inside_any.add(id(e))
            c = e.get("args", {}).get("correlation")
            if c in gpu:
                row["gpu_ms"] += gpu[c] / 1e3
                row["kernels"] += 1
            if e["name"] in SYNC_CALLS:
                row["syncs"] += 1
                row["sync_ms"] += float(e.get("dur", 0.0)) / 1e3
    outside = [
        e
        for v in calls_by_tid.values()
        for e in v
        if e["name"] in SYNC_CALLS and id(e) not in inside_any
    ]
    for row in modules.values():
        for k in ("host_ms", "gpu_ms", "sync_ms"):
            row[k] = round(row[k], 4)
    return {
        "modules": dict(sorted(modules.items(), key=lambda kv: -kv[1]["host_ms"])),
        "syncs_outside_modules": {
            "count": len(outside),
            "ms": round(sum(float(e.get("dur", 0.0)) for e in outside) / 1e3, 4),
        },
    }


def host_pace_markdown(results: dict, top: int = 12) -> str:
    """{label: host_pace()} as one table per label (the `top` modules by host time)."""
    text = ""
    for k, hp in results.items():
        so = hp["syncs_outside_modules"]
        text += (
            f"\n{k}: host time per module forward against the GPU time it launched; "
            f"{so['count']} device syncs outside modules ({so['ms']:.2f} ms waiting)\n\n"
            "| module | calls | host ms | GPU ms | kernels | syncs | sync wait ms |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
        )
        for name, r in list(hp["modules"].items())[:top]:
            text += (
                f"| {name} | {r['calls']} | {r['host_ms']:.2f} | {r['gpu_ms']:.2f} | "
                f"{r['kernels']} | {r['syncs']} | {r['sync_ms']:.2f} |\n"
            )
    return text


def _pct(b: dict, c: str) -> str:
    return f"{100 * b['exclusive_ms'][c] / b['wall_ms']:.1f}%" if b["wall_ms"] else "-"


def markdown(results: dict, n_kernels: int = 8) -> str:
    """A table of one or more breakdowns {label: breakdown()}: ms and % of the wall time per
    exclusive category, then the summed kernel time per category; then per label the largest
    host gaps and the `n_kernels` kernel names with the most time."""
    labels = list(results)
    head = "| | " + " | ".join(labels) + " |\n| --- |" + " --- |" * len(labels) + "\n"
    rows = ["| wall (ms) | " + " | ".join(f"{results[k]['wall_ms']:.2f}" for k in labels) + " |"]
    for c in EXCLUSIVE:
        cells = [f"{results[k]['exclusive_ms'][c]:.2f} ({_pct(results[k], c)})" for k in labels]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    rows.append("| *kernel time, all streams (ms)* |" + " |" * len(labels))
    for c in CATEGORIES:
        rows.append(
            f"| {c} | " + " | ".join(f"{results[k]['kernel_ms'][c]:.2f}" for k in labels) + " |"
        )
    text = head + "\n".join(rows) + "\n"
    for k in labels:
        b = results[k]
        tops = [dict(t, category=c) for c, ts in b.get("top_kernels", {}).items() for t in ts]
        tops.sort(key=lambda t: -t["ms"])
        gaps = b.get("host_gaps", {})
        text += (
            f"\n{k}: {gaps.get('count', 0)} idle stretches, largest "
            + ", ".join(f"{g['ms']:.2f} ms at {g['at_ms']:.1f}" for g in gaps.get("largest", []))
            + "; largest kernels:\n\n| kernel | category | ms | count |\n| --- | --- | --- | --- |\n"
            + "".join(
                f"| `{t['name'][:70]}` | {t['category']} | {t['ms']:.2f} | {t['count']} |\n"
                for t in tops[:n_kernels]
            )
        )
    return text


def module_scope_hooks():
    """Global forward pre/post hooks (torch.nn) that put an `nn.Module: <Class>` record_function
    range around every module's forward, so that the trace carries module scopes without
    `with_stack` (whose Python tracer slows the host and so inflates host gaps). Returns the two
    hook handles. Needs torch; the rest of this module does not."""
    import torch

    stack: list = []

    def pre(module, args):
        rf = torch.autograd.profiler.record_function(f"nn.Module: {type(module).__name__}")
        rf.__enter__()
        stack.append(rf)

    def post(module, args, output):
        if stack:
            stack.pop().__exit__(None, None, None)

    from torch.nn.modules import module as M

    return M.register_module_forward_pre_hook(pre), M.register_module_forward_hook(post)


__all__ = [
    "CATEGORIES",
    "EXCLUSIVE",
    "breakdown",
    "categorize",
    "gpu_events",
    "host_pace",
    "host_pace_markdown",
    "load",
    "markdown",
    "module_scope_hooks",
]
