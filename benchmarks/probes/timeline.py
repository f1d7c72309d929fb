"""Probe (not a benchmark): where the host and the GPU spend one fwd+bwd of a MoE layer recipe.

    torchrun --nproc-per-node 2 -m benchmarks.probes.timeline --recipe moe_fine64_ep2 \
        --variants stock,fluid --out OUT [--what timeline,stages,cprofile]

Per variant (benchmarks/recipes.py names; layers built as the benchmark builds them,
benchmarks/layer_job.build_moe):
  timeline: every rank's GPU timeline of one fwd+bwd (after a warm-up) with FluidMoELayer's forward
    stages annotated, rows [stream, start ms, duration ms, name]; summarized by
    fluid.testing.bench.timeline (benchmarks/probes/timeline_summary.py prints it);
  stages: host time per forward stage and of the fwd and bwd calls, microseconds per step, no
    profiler (a stage that waits for the device includes that wait);
  cprofile: cProfile of --iters steps, own time per function.
Writes OUT/timeline_<recipe>.json (rank 0). A layer is host-bound when the GPU idles while Python
and the launches catch up: compare compute idle with the host time per stage.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import time

import torch
import torch.distributed as dist

from benchmarks import recipes as R
from benchmarks.layer_job import build_moe


def kernel_timeline(layer, step) -> list:
    from torch.profiler import ProfilerActivity, profile, record_function

    from fluid.testing.bench.stages import stage_hooks

    step()
    with (
        profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof,
        stage_hooks(layer, record_function),
    ):
        with record_function("fwd"):
            step.fwd()
        with record_function("bwd"):
            step.bwd()
        torch.cuda.synchronize()
    rows = []
    for e in prof.profiler.kineto_results.events():
        gpu = "cuda" in str(e.device_type()).lower()
        if not gpu and e.name() not in ("fwd", "bwd") and not e.name().startswith("stage:"):
            continue
        rows.append(
            [
                e.device_resource_id() if gpu else "cpu",
                e.start_ns() / 1e6,
                e.duration_ns() / 1e6,
                e.name()[:70],
            ]
        )
    t0 = min(r[1] for r in rows) if rows else 0.0
    return sorted(
        [[r[0], round(r[1] - t0, 4), round(r[2], 4), r[3]] for r in rows], key=lambda r: r[1]
    )


def stage_times(layer, step, iters: int, cuda: bool) -> dict:
    from fluid.testing.bench.stages import stage_hooks

    acc: dict = {}

    @contextlib.contextmanager
    def timed(name):
        t = time.perf_counter()
        yield
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with stage_hooks(layer, timed):
        step()
        sync()
        acc.clear()
        for _ in range(iters):
            with timed("host:fwd"):
                step.fwd()
            with timed("host:bwd"):
                step.bwd()
        with timed("device:drain"):
            sync()
    return {k: round(v / iters * 1e6, 1) for k, v in acc.items()}


def host_profile(step, iters: int, top: int = 45) -> str:
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        step()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


class _Step:
    """A step split into its forward and backward calls (for annotations and host timers)."""

    def __init__(self, layer, x, dy):
        self.layer, self.x, self.dy, self.out = layer, x, dy, None

    def fwd(self):
        from fluid.testing.moe import reset_ddp_flags

        reset_ddp_flags(self.layer.parameters())
        self.out, _ = self.layer(self.x)

    def bwd(self):
        self.out.backward(self.dy)
        self.out = None
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None

    def __call__(self):
        self.fwd()
        self.bwd()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--variants", default="stock,fluid")
    ap.add_argument("--what", default="timeline,stages,cprofile")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    cuda = args.device == "cuda"
    recipe = R.get(args.recipe)
    if recipe.kind != "moe":
        raise SystemExit(f"{recipe.name} is not a MoE layer recipe")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    variants = args.variants.split(",")
    layers, _, shape = build_moe(recipe, cuda, device, dist.get_world_size(), variants)
    from fluid.testing.bench.timeline import summarize

    g = torch.Generator(device="cpu").manual_seed(7 + dist.get_rank())
    dtype = torch.bfloat16 if cuda else torch.float32
    x = (
        torch.randn(shape["tokens_per_rank"], 1, shape["hidden"], generator=g)
        .to(device, dtype)
        .requires_grad_(True)
    )
    dy = torch.randn(shape["tokens_per_rank"], 1, shape["hidden"], generator=g).to(device, dtype)
    what = args.what.split(",")
    out = {"recipe": recipe.to_dict(), "shape": shape, "variants": {}}
    for name in variants:
        layer = layers[name]
        step = _Step(layer, x, dy)
        res = {}
        if "timeline" in what and cuda:
            rows = kernel_timeline(layer, step)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, rows)
            res["timeline_ranks"] = ranks
            res["summary_ranks"] = [summarize(r) for r in ranks]
        if "stages" in what:
            res["stage_times_us"] = stage_times(layer, step, args.iters, cuda)
        if "cprofile" in what:
            res["host_profile"] = host_profile(step, args.iters)
        out["variants"][name] = res
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"timeline_{recipe.name}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"[timeline] wrote {path}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
