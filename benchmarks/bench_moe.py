"""Benchmark: stock MoELayer vs FluidMoELayer (scheduler off/on, chunks 1/2/4), one host, EP = world.

    CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 \
        torchrun --nproc-per-node 4 benchmarks/bench_moe.py --out docs/benchmarks/raw/nvlink
    # the multi-node stand-in: same with NCCL_P2P_DISABLE=1 (see docs/hardware.md)
    # CPU dry run (tiny sizes, gloo, catches crashes; numbers meaningless):
    torchrun --nproc-per-node 2 benchmarks/bench_moe.py --device cpu --out /tmp/bench_moe

Per configuration (Mixtral-like H4096 F14336 E8 top-2, fine-grained H2048 F1408 E64 top-6, 4096
tokens per rank, bf16) and variant, medians over --iters after --warmup (CUDA events, rank 0):
  fwd_ms, fwdbwd_ms, bwd_ms = fwdbwd - fwd; peak_gb = param bytes of the layer + peak allocation
  above the steady state during fwd+bwd; speedup = stock fwdbwd / variant fwdbwd.
Fluid variants: fluid_{off,on}_c{chunks} (scheduler off/on, forward chunks; expert GEMMs as
  FLUID_GROUPED_MM=auto picks), fluid_on_c1_loop / fluid_on_c1_grouped (per-expert GEMM loop /
  torch._grouped_mm forced), fluid_on_c1_dedup (deduplicated dispatch),
  and --extra-variants, e.g. fluid_on_c2_sm16 (GEMMs beside an all-to-all leave 16 SMs to NCCL).
Fluid only:
  dw_ms = fwdbwd (scheduler off) - fwdbwd (scheduler off, expert weights frozen so no expert dW);
  a2a_ms = one all-to-all of the dispatch volume ([tokens*topk, H] bf16, even splits), timed
  alone; the backward has two of them (combine and dispatch gradients), a2a_bwd_ms = 2 * a2a_ms;
  overlap_eta = (bwd_serial - bwd) / min(dw_ms, a2a_bwd_ms), with bwd_serial the backward with
  the scheduler off (chunks 1): eta = (T_serial - T_measured)/(T_serial - T_ideal), docs/hardware.md.
  sched_stats: the BackwardScheduler counters of one extra timed iteration (timing mode).
stock_repeat: stock measured again after the Fluid variants (both layers stay resident);
  stock_drift = its fwdbwd / the first one's, the run-to-run noise the speedups carry.
paired (--paired-rounds R > 0, CUDA): R alternating rounds of stock and Fluid (--paired-variant,
  default fluid_on_c1; 'best' = the fastest Fluid variant of the run), --iters fwd+bwd each;
  per-round speedup = stock median / Fluid median, and their median and range. Host drift then hits both sides of each ratio alike. --paired-onoff: the
  same for Fluid scheduler off vs on (on_over_off per round); --paired-ab A,B for any two Fluid
  variants (b_over_a per round).
--ddp-grads: both layers' parameters get Megatron DDP's fp32 main_grad and its grad hook
  (fluid.moe.testing.emulate_ddp_grads), so peak_gb counts the gradients a backward adds
  transiently under DDP.
Host-side views (the 64-expert layer is host-bound: the GPU idles while Python and launches catch up):
  --trace VARIANTS: every rank's GPU timeline of one fwd+bwd with FluidMoELayer's forward stages
  annotated (benchmarks/timeline_summary.py summarizes it); --stage-times VARIANTS: host time per
  forward stage without the profiler; --host-profile VARIANTS: a cProfile of --iters fwd+bwd.
  A variant name may end in #tag to measure the same settings again later in the run.
Writes <out>/bench_moe.json (argv, card, env, results); benchmarks/moe_report.py renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._timing import Timer  # noqa: E402

CONFIGS = {
    "mixtral": dict(hidden=4096, ffn=14336, num_experts=8, topk=2),
    "fine": dict(hidden=2048, ffn=1408, num_experts=64, topk=6),
    "e2e": dict(hidden=2048, ffn=5632, num_experts=8, topk=2),  # benchmarks/e2e.py's MoE layer
}
TINY = {
    "mixtral": dict(hidden=64, ffn=128, num_experts=4, topk=2),
    "fine": dict(hidden=32, ffn=24, num_experts=8, topk=6),
    "e2e": dict(hidden=32, ffn=48, num_experts=4, topk=2),
}


def param_bytes(layer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def fwdbwd_step(layer, x, dy, timed=None):
    """One timed unit: forward, backward, then drop the gradients (set_to_none).

    `timed(name)`, if given, is a context manager around the forward ("host:fwd") and the backward
    ("host:bwd") calls (stage_times)."""
    from fluid.moe.testing import reset_ddp_flags

    timed = timed or (lambda name: contextlib.nullcontext())

    def fwdbwd():
        reset_ddp_flags(layer.parameters())  # --ddp-grads: as DDP's zero_grad_buffer each step
        with timed("host:fwd"):
            out, _ = layer(x)
        with timed("host:bwd"):
            out.backward(dy)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return fwdbwd


def bench_layer(layer, x, dy, timer, args, cuda):
    def fwd():
        out, _ = layer(x)
        del out

    fwdbwd = fwdbwd_step(layer, x, dy)
    res = {"fwd_ms": timer(fwd, args.warmup, args.iters)}
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    res["fwdbwd_ms"] = timer(fwdbwd, args.warmup, args.iters)
    res["bwd_ms"] = res["fwdbwd_ms"] - res["fwd_ms"]
    if cuda:
        res["peak_gb"] = (param_bytes(layer) + torch.cuda.max_memory_allocated() - base) / 2**30
    return res


# FluidMoELayer forward stages whose host time --stage-times and the traced timelines report:
# (attribute path from the layer, method name).
FLUID_STAGES = [("", "route"), ("token_dispatcher", "dispatch_preprocess"),
                ("token_dispatcher", "dispatch_chunks"), ("token_dispatcher", "launch_dispatch_part"),
                ("token_dispatcher", "dispatch_postprocess"), ("experts", "forward"),
                ("token_dispatcher", "combine_preprocess"), ("token_dispatcher", "launch_combine"),
                ("token_dispatcher", "combine_postprocess")]


_MISSING = object()


@contextlib.contextmanager
def stage_hooks(layer, enter_exit):
    """Wrap each FLUID_STAGES method of a FluidMoELayer (instance attributes, removed on exit):
    `enter_exit(name)` is a context manager entered around every call. On exit each object gets
    back exactly what it had (its own attribute, or none). A stock layer (no
    token_dispatcher.dispatch_chunks) is left alone."""
    wrapped = []
    if hasattr(getattr(layer, "token_dispatcher", None), "dispatch_chunks"):
        for path, meth in FLUID_STAGES:
            obj = getattr(layer, path) if path else layer
            fn = getattr(obj, meth)
            name = f"stage:{path + '.' if path else ''}{meth}"

            def call(*a, _fn=fn, _name=name, **k):
                with enter_exit(_name):
                    return _fn(*a, **k)

            wrapped.append((obj, meth, vars(obj).get(meth, _MISSING)))
            setattr(obj, meth, call)
    try:
        yield
    finally:
        for obj, meth, own in reversed(wrapped):
            if own is _MISSING:
                delattr(obj, meth)  # the class's method shows through again
            else:
                setattr(obj, meth, own)  # an instance attribute it had before


def stage_times(layer, x, dy, iters):
    """Host time per forward stage (FLUID_STAGES) and of the whole forward and backward calls,
    microseconds per fwd+bwd, no profiler. A stage that waits for the device (dispatch_chunks
    waits for the split sizes; a wait on an all-to-all does not block the host) includes that wait."""
    acc: dict = {}

    @contextlib.contextmanager
    def timed(name):
        t = time.perf_counter()
        yield
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    step = fwdbwd_step(layer, x, dy, timed)
    with stage_hooks(layer, timed):
        step()
        sync()
        acc.clear()
        for _ in range(iters):
            step()
        with timed("device:drain"):
            sync()
    return {k: round(v / iters * 1e6, 1) for k, v in acc.items()}


def host_profile(layer, x, dy, iters, top=45):
    """cProfile of `iters` fwd+bwd (after one warm-up): the Python functions and builtins the
    host spends its time in, as pstats text sorted by own time (rank 0 reports it)."""
    import cProfile
    import io
    import pstats

    step = fwdbwd_step(layer, x, dy)
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        step()
    prof.disable()
    if x.is_cuda:
        torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def kernel_timeline(layer, x, dy):
    """GPU timeline of one fwd+bwd (after one warm-up), rank 0's view: every kernel, copy and
    annotation as [stream, start ms, duration ms, name], start relative to the first. Shows
    where the compute stream idles while an all-to-all runs (what a kernel-time sum cannot)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(2):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof, \
                stage_hooks(layer, record_function):
            with record_function("fwd"):
                out, _ = layer(x)
            with record_function("bwd"):
                out.backward(dy)
            torch.cuda.synchronize()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    rows = []
    for e in prof.profiler.kineto_results.events():
        if "cuda" not in str(e.device_type()).lower() and e.name() not in ("fwd", "bwd") \
                and not e.name().startswith("stage:"):
            continue
        rows.append([e.device_resource_id() if "cuda" in str(e.device_type()).lower() else "cpu",
                     e.start_ns() / 1e6, e.duration_ns() / 1e6, e.name()[:70]])
    t0 = min(r[1] for r in rows) if rows else 0.0
    rows = sorted([[r[0], round(r[1] - t0, 4), round(r[2], 4), r[3]] for r in rows], key=lambda r: r[1])
    return rows


def _add_timeline(out: dict, name: str, rows: list) -> None:
    """Rank 0's timeline under out["timeline"][name], every rank's under out["timeline_ranks"][name]
    (a late rank makes the others wait inside their all-to-alls: only all ranks' views show it).
    Collective over the world (= the EP group here): every rank calls it for the same names in
    the same order."""
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, rows)
    out.setdefault("timeline", {})[name] = rows
    out.setdefault("timeline_ranks", {})[name] = ranks


def profile_kernels(layer, x, dy, chunks=None, top=25):
    """CUDA time per kernel name for one fwd+bwd (after one warm-up), largest first: where the
    per-chunk cost of forward pipelining goes (Fluid at `chunks`), or, for the stock layer
    (`chunks=None`), what stock spends where Fluid's backward is slower."""
    from torch.profiler import ProfilerActivity, profile

    from fluid.moe.testing import set_num_chunks

    if chunks is not None:
        set_num_chunks(layer, chunks)
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            out, _ = layer(x)
            out.backward(dy)
            torch.cuda.synchronize()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    if chunks is not None:
        set_num_chunks(layer, 1)
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = e.self_cuda_time_total
        if dev > 0:
            rows.append((e.key[:90], e.count, dev / 1e3))
    rows.sort(key=lambda r: -r[2])
    cpu_total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    return {"top_kernels_ms": rows[:top], "cuda_total_ms": sum(r[2] for r in rows),
            "cpu_self_total_ms": cpu_total}


def apply_variant(fluid, vname: str) -> bool:
    """Configure `fluid` for a variant named fluid_{on,off}_c<chunks>[_loop|_grouped][_dedup][_sm<n>]
    [#tag] (a tag names a repeat of the same settings, e.g. fluid_on_c1#2 measured again later).

    on/off: BackwardScheduler enabled; c<chunks>: forward chunks; _loop / _grouped: per-expert
    cuBLAS GEMMs / torch._grouped_mm (FLUID_GROUPED_MM=0 / 1; without either the default, auto:
    per expert for large experts, where dW is not deferred also per expert in backward); _dedup:
    deduplicated dispatch; _sm<n>: GEMMs beside an all-to-all leave n SMs to NCCL
    (CommContext.sm_carveout; without it the default, "auto"). Returns whether the scheduler is
    on."""
    from fluid.moe.testing import set_dedup, set_num_chunks
    from fluid.schedule import get_backward_scheduler

    parts = vname.split("#")[0].split("_")  # "#<tag>": a repeat of the same settings
    if parts[0] != "fluid" or parts[1] not in ("on", "off") or not parts[2].startswith("c"):
        raise ValueError(f"bad variant name {vname!r}")
    opts = parts[3:]
    sm = [int(o[2:]) for o in opts if o.startswith("sm")]
    unknown = [o for o in opts if o not in ("loop", "grouped", "dedup") and not o.startswith("sm")]
    if unknown:
        raise ValueError(f"bad variant option(s) {unknown} in {vname!r}")
    set_dedup(fluid, False)
    set_num_chunks(fluid, int(parts[2][1:]))
    set_dedup(fluid, "dedup" in opts)
    fluid.comm.sm_carveout = sm[0] if sm else "auto"
    os.environ["FLUID_GROUPED_MM"] = "0" if "loop" in opts else "1" if "grouped" in opts else "auto"
    sched = get_backward_scheduler()
    sched.enable() if parts[1] == "on" else sched.disable()
    return parts[1] == "on"


def paired_rounds(stock, fluid, x, dy, timer, args, variant):
    """Alternate stock and Fluid fwd+bwd for `args.paired_rounds` rounds (see module doc)."""
    apply_variant(fluid, variant)
    rounds = []
    for _ in range(args.paired_rounds):
        ms = {}
        for name, layer in (("stock", stock), ("fluid", fluid)):
            ms[name] = timer(fwdbwd_step(layer, x, dy), 1, args.iters)
        rounds.append({**ms, "speedup": ms["stock"] / ms["fluid"]})
    apply_variant(fluid, "fluid_on_c1")
    return {"variant": variant, "rounds": rounds, **_spread(rounds, "speedup")}


def _spread(rounds, key):
    """`{key}_median`, `{key}_min`, `{key}_max` of `key` over the rounds."""
    v = sorted(r[key] for r in rounds)
    return {f"{key}_median": v[len(v) // 2], f"{key}_min": v[0], f"{key}_max": v[-1]}


def paired_ab(fluid, x, dy, timer, args, a: str, b: str, key: str):
    """Alternate two Fluid variants a, b for `args.paired_rounds` rounds: per round `key` =
    b's fwd+bwd / a's (> 1: b is slower), drift-robust like `paired_rounds`."""
    rounds = []
    for _ in range(args.paired_rounds):
        ms = {}
        for name in (a, b):
            apply_variant(fluid, name)
            ms[name] = timer(fwdbwd_step(fluid, x, dy), 1, args.iters)
        rounds.append({**ms, key: ms[b] / ms[a]})
    apply_variant(fluid, "fluid_on_c1")
    return {"a": a, "b": b, "rounds": rounds, **_spread(rounds, key)}


def paired_onoff(fluid, x, dy, timer, args):
    """Fluid with the scheduler off, then on (chunks 1, default settings): per-round slowdown
    on_over_off (the "scheduler on never slower than off by more than 2%" target)."""
    return paired_ab(fluid, x, dy, timer, args, "fluid_off_c1", "fluid_on_c1", "on_over_off")


def a2a_alone(rows, hidden, dtype, device, timer, args):
    x = torch.randn(rows - rows % dist.get_world_size(), hidden, dtype=dtype, device=device)
    out = torch.empty_like(x)
    return timer(lambda: dist.all_to_all_single(out, x), args.warmup, args.iters)


def run_config(name, shape, args, cuda, device, pg, ws):
    from fluid.moe.testing import moe_config, set_num_chunks, stock_and_fluid
    from fluid.schedule import get_backward_scheduler

    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = moe_config(ep=ws, dtype=dtype, init_method_std=0.02, **shape)
    torch.manual_seed(0)
    stock, fluid = stock_and_fluid(cfg, pg, device)
    if args.ddp_grads:
        from fluid.moe.testing import emulate_ddp_grads

        stock._ddp_grad_accs = emulate_ddp_grads(stock.parameters())
        fluid._ddp_grad_accs = emulate_ddp_grads(fluid.parameters())
    T, H = args.tokens, shape["hidden"]
    x = torch.randn(T, 1, H, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(T, 1, H, dtype=dtype, device=device)
    timer = Timer(cuda)
    sched = get_backward_scheduler()
    out = {"shape": shape, "tokens_per_rank": T, "variants": {}}
    if cuda:
        out["variants"]["stock"] = bench_layer(stock, x, dy, timer, args, cuda)
        if args.profile:
            out["kernel_profile_stock"] = profile_kernels(stock, x, dy)

    variants = ["fluid_off_c1", "fluid_on_c1", "fluid_on_c2", "fluid_on_c4",
                "fluid_on_c1_loop",  # per-expert cuBLAS GEMMs
                "fluid_on_c1_grouped",  # torch._grouped_mm
                "fluid_on_c1_dedup"]  # one row per (token, destination rank)
    variants += [v for v in args.extra_variants.split(",") if v and v not in variants]
    for vname in variants:
        on = apply_variant(fluid, vname)
        res = bench_layer(fluid, x, dy, timer, args, cuda)
        if on:  # one extra iteration with scheduler timing for its counters
            sched.timing = True
            sched.reset_stats()
            o, _ = fluid(x)
            o.backward(dy)
            res["sched_stats"] = sched.get_stats()
            sched.timing = False
            fluid.zero_grad(set_to_none=True)
            x.grad = None
        out["variants"][vname] = res
        if vname in args.host_profile.split(","):
            res["host_profile"] = host_profile(fluid, x, dy, args.iters)
        if vname in args.stage_times.split(","):
            res["stage_times_us"] = stage_times(fluid, x, dy, args.iters)
        if cuda and vname in args.trace.split(","):
            _add_timeline(out, vname, kernel_timeline(fluid, x, dy))
    if cuda and "stock" in args.trace.split(","):
        _add_timeline(out, "stock", kernel_timeline(stock, x, dy))
    apply_variant(fluid, "fluid_on_c1")
    if cuda:  # stock again after the Fluid variants: how much the host drifted meanwhile
        out["variants"]["stock_repeat"] = bench_layer(stock, x, dy, timer, args, cuda)
        out["stock_drift"] = (
            out["variants"]["stock_repeat"]["fwdbwd_ms"] / out["variants"]["stock"]["fwdbwd_ms"]
        )
    if cuda and args.paired_rounds > 0:
        pv = args.paired_variant
        if pv == "best":  # the fastest Fluid variant of this run, re-measured against stock
            pv = min((v for v in out["variants"] if v.startswith("fluid")),
                     key=lambda v: out["variants"][v]["fwdbwd_ms"])
        out["paired"] = paired_rounds(stock, fluid, x, dy, timer, args, pv)
        if args.paired_onoff:
            out["paired_onoff"] = paired_onoff(fluid, x, dy, timer, args)
        if args.paired_ab:
            a, b = args.paired_ab.split(",")
            out["paired_ab"] = paired_ab(fluid, x, dy, timer, args, a, b, "b_over_a")
    del stock
    if cuda:
        torch.cuda.empty_cache()

    if args.profile and cuda:
        out["kernel_profile"] = {c: profile_kernels(fluid, x, dy, c) for c in (1, 2)}
    from fluid.moe.grouped_gemm import _BROKEN

    out["grouped_mm_fallback"] = list(_BROKEN)  # non-empty: torch._grouped_mm was rejected

    # dW time: scheduler off, expert weights frozen (their dW closures skip all work).
    set_num_chunks(fluid, 1)
    sched.disable()
    for p in fluid.experts.parameters():
        p.requires_grad_(False)
    nodw = bench_layer(fluid, x, dy, timer, args, cuda)
    for p in fluid.experts.parameters():
        p.requires_grad_(True)
    sched.enable()
    off = out["variants"]["fluid_off_c1"]
    dw_ms = max(off["fwdbwd_ms"] - nodw["fwdbwd_ms"], 0.0)
    a2a_ms = a2a_alone(T * shape["topk"], H, dtype, device, timer, args)
    out.update(dw_ms=dw_ms, a2a_ms=a2a_ms, a2a_bwd_ms=2 * a2a_ms)
    denom = min(dw_ms, 2 * a2a_ms)
    stock_fb = out["variants"].get("stock", {}).get("fwdbwd_ms")
    for vname, res in out["variants"].items():
        if vname.startswith("fluid"):
            res["overlap_eta"] = (off["bwd_ms"] - res["bwd_ms"]) / denom if denom > 0 else None
        if stock_fb:
            res["speedup_vs_stock"] = stock_fb / res["fwdbwd_ms"]
    del fluid
    if cuda:
        torch.cuda.empty_cache()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--configs", default="mixtral,fine")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (4096; 64 on cpu)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--paired-rounds", type=int, default=0,
                   help="R alternating stock/Fluid rounds for a drift-robust speedup (CUDA)")
    p.add_argument("--paired-variant", default="fluid_on_c1",
                   help="the Fluid variant of the paired rounds (see apply_variant), or 'best': "
                        "the fastest Fluid variant of this run")
    p.add_argument("--paired-onoff", action="store_true",
                   help="with --paired-rounds: also alternate Fluid scheduler off / on (paired_onoff)")
    p.add_argument("--paired-ab", default="",
                   help="with --paired-rounds: 'A,B', two Fluid variants alternated (b_over_a per "
                        "round, > 1: B is slower), e.g. fluid_on_c1,fluid_on_c1_grouped")
    p.add_argument("--extra-variants", default="",
                   help="more Fluid variants, comma-separated, e.g. fluid_on_c2_sm16 (see apply_variant)")
    p.add_argument("--trace", default="",
                   help="variants (or 'stock') whose GPU timeline of one fwd+bwd goes in the JSON")
    p.add_argument("--stage-times", default="",
                   help="variants whose host time per forward stage (no profiler) goes in the JSON")
    p.add_argument("--host-profile", default="",
                   help="variants whose cProfile (own time per function, --iters fwd+bwd) goes in the JSON")
    p.add_argument("--ddp-grads", action="store_true",
                   help="both layers' parameters get Megatron DDP's fp32 main_grad and grad hook "
                        "(see fluid.moe.testing.emulate_ddp_grads), as in training")
    p.add_argument("--profile", action="store_true",
                   help="also record the top CUDA kernels of one fwd+bwd at chunks 1 and 2")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if args.tokens is None:
        args.tokens = 4096 if cuda else 64
    if not cuda:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)

    from fluid.moe.testing import init_expert_parallel_world

    rank, ws, device, pg = init_expert_parallel_world(cuda)

    results = {}
    for name in args.configs.split(","):
        t0 = time.time()
        shape = (CONFIGS if cuda else TINY)[name]
        results[name] = run_config(name, shape, args, cuda, device, pg, ws)
        results[name]["wall_s"] = time.time() - t0
        if rank == 0:
            print(f"[bench_moe] {name}: " + json.dumps(results[name]["variants"], default=str)[:2000],
                  flush=True)

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        doc = {
            "argv": sys.argv,
            "command": " ".join(["torchrun", f"--nproc-per-node {ws}"] + sys.argv),
            "card": torch.cuda.get_device_name() if cuda else "cpu",
            "world_size": ws,
            "env": {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "CUDA_DEVICE_MAX_CONNECTIONS",
                                                  "NCCL_NVLS_ENABLE", "FLUID_OVERLAP")},
            "torch": torch.__version__,
            "results": results,
        }
        path = os.path.join(args.out, "bench_moe.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"[bench_moe] wrote {path}", flush=True)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
