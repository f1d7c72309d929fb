"""One job of a layer recipe (MoE layer or attention), under torchrun; started by benchmarks/run.py.

    torchrun --nproc-per-node N -m benchmarks.layer_job --recipes NAME --link LINK --out JOB.json
    # dry run (CPU, gloo, tiny shapes; every recipe in one job of 2 ranks):
    torchrun --nproc-per-node 2 -m benchmarks.layer_job --recipes all --dry-run --out JOB.json

Every variant of the recipe is built once, holding the same weights (the stock layer's state dict
loaded into each Fluid layer, the checkpoint path); its TransformerConfig carries the variant's
fields. Then `rounds` alternating rounds (A B C A' A B C A' ...), each variant's median fwd+bwd
over `iters` steps per round (CUDA events, all ranks start each step together, rank 0 reports).
After the rounds, per variant: the peak memory of one step (max over ranks) and, for Fluid
variants, the scheduler's per-window CUDA events over `iters` steps (fluid.testing.bench.overlap).
Writes JSON (rank 0): {recipe name: {variants: {name: {ms, rounds_ms, peak_gb, comm}}, rounds,
ratios, wall_s}}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from benchmarks import recipes as R

# Tiny shapes of the dry run (CPU, gloo): same structure (experts, top-k, shared expert, GQA).
TINY_MOE = {
    "mixtral": dict(hidden=64, ffn=96, experts=8, topk=2, shared_ffn=None),
    "fine": dict(hidden=32, ffn=24, experts=16, topk=6, shared_ffn=48),
    "small": dict(hidden=32, ffn=48, experts=8, topk=2, shared_ffn=None),
    "qwen3moe": dict(hidden=32, ffn=16, experts=16, topk=8, shared_ffn=None),
    "olmoe": dict(hidden=32, ffn=24, experts=16, topk=8, shared_ffn=None),
    "dbrx": dict(hidden=64, ffn=96, experts=8, topk=4, shared_ffn=None),
}
TINY_ATTN = {
    "mixtral": dict(heads=8, groups=2, head_dim=8),
    "fine": dict(heads=4, groups=2, head_dim=8),
    "small": dict(heads=4, groups=2, head_dim=8),
}


def config_fields(fields: dict) -> dict:
    """A variant's fields for a layer's TransformerConfig: every one must be a field (a missing
    one fails here, naming it); `use_fluid_moe` is a model-level switch, dropped (the layer path
    builds the Fluid layer directly)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    missing = sorted(k for k in fields if k not in names)
    if missing:
        raise SystemExit(
            f"TransformerConfig has no field(s) {missing}: the Fluid config fields "
            "(patch 0001) are missing from this Megatron tree"
        )
    return {k: v for k, v in fields.items() if k != "use_fluid_moe"}


def scheduler_of(layer):
    """The BackwardScheduler of a Fluid layer's model (its `fluid_runtime`, one per model); for a
    layer without one (stock), the scheduler of the model built last."""
    for m in layer.modules():
        rt = getattr(m, "fluid_runtime", None)
        if rt is not None:
            return rt.scheduler
    from fluid.schedule import get_backward_scheduler

    return get_backward_scheduler()


@contextlib.contextmanager
def scheduler_timing(layer):
    sched = scheduler_of(layer)
    old = sched.timing
    sched.set_timing(True)
    sched.reset_stats()
    try:
        yield sched
    finally:
        sched.set_timing(old)


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _peak_gb(step, resident_bytes: int, cuda: bool, device):
    """Resident bytes of the variant (params, DDP main_grad) + what one step adds above the steady
    state, max over ranks; None on CPU."""
    if not cuda:
        step()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    gb = (resident_bytes + torch.cuda.max_memory_allocated() - base) / 2**30
    return _max_over_ranks(gb, device)


def _resident_bytes(layer) -> int:
    n = 0
    for p in layer.parameters():
        n += p.numel() * p.element_size()
        mg = getattr(p, "main_grad", None)
        if mg is not None:
            n += mg.numel() * mg.element_size()
    return n


def _measure(recipe, steps: dict, layers: dict, args, cuda, device) -> dict:
    from fluid.testing.bench.overlap import window_comm
    from fluid.testing.bench.timing import Timer, alternating_rounds, round_ratios, spread

    timer = Timer(cuda)
    # Stock Megatron's router needs CUDA: the CPU dry run builds the stock layer but runs Fluid only.
    order = [v for v in recipe.variants if cuda or R.variant_fields(v)]
    rounds, iters, warmup = args.rounds or recipe.rounds, args.iters or recipe.iters, recipe.warmup
    if not cuda:
        rounds, iters, warmup = 2, 1, 1
    for name in order:  # warm-up of every variant before the first round
        for _ in range(warmup):
            steps[name]()
    rr = alternating_rounds(steps, order, rounds, 1 if cuda else 0, iters, timer)
    out = {"rounds": rr, "iters_per_round": iters, "variants": {}}
    for name in order:
        v = {"ms": spread([r[name] for r in rr])["median"], "rounds_ms": [r[name] for r in rr]}
        if "#" not in name:
            v["peak_gb"] = _peak_gb(steps[name], _resident_bytes(layers[name]), cuda, device)
            if R.variant_fields(name).get("use_fluid_moe") or recipe.kind == "attn":
                with scheduler_timing(layers[name]) as sched:
                    for _ in range(iters):
                        steps[name]()
                    stats = sched.get_stats()
                v["sched_stats"] = {
                    k: val for k, val in stats.items() if not isinstance(val, (list, dict))
                }
                v["comm"] = window_comm(stats, iters)
                want_on = R.variant_fields(name).get("fluid_scheduler", True)
                if stats.get("enabled") is not None and bool(stats["enabled"]) != want_on:
                    v["error"] = (
                        f"the scheduler its layer uses was {'on' if stats['enabled'] else 'off'}: "
                        "the variant's config did not reach it"
                    )
                elif not want_on and stats.get("inline_dw_tasks") != stats.get("total_dw_tasks"):
                    v["error"] = "scheduler off, yet dW was deferred"
                if v.get("error"):
                    out.setdefault("errors", []).append(f"{name}: {v['error']}")
        out["variants"][name] = v
    ratios = {}
    base = "stock" if "stock" in order else None
    if base:
        for name in order:
            if name != base:
                ratios[f"{base}/{name}"] = round_ratios(rr, base, name)
    if "fluid_off" in order and "fluid" in order:
        ratios["fluid_off/fluid"] = round_ratios(rr, "fluid_off", "fluid")
    if "fluid_off#2" in order:
        ratios["fluid_off/fluid_off#2"] = round_ratios(rr, "fluid_off", "fluid_off#2")
    out["ratios"] = ratios
    return out


# -- MoE layer --------------------------------------------------------------------------------


def build_moe(recipe: R.MoELayerRecipe, cuda, device, ws, variants=None, link: str = "nvlink"):
    """Model-parallel state (EP = recipe.ep), one layer per variant holding the same weights, the
    inputs, and a fwd+bwd step per variant; Fluid's variants over an emulated `link` get its flag
    (recipes.LINK_FIELDS). Returns (layers, steps, shape); the probes use it too."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from fluid.moe import FluidMoELayer
    from fluid.testing.moe import (
        emulate_ddp_grads,
        local_moe_submodules,
        moe_config,
        reset_ddp_flags,
    )

    m = recipe.model_spec
    shape = dict(
        hidden=m.hidden, ffn=m.ffn, experts=m.experts, topk=m.topk, shared_ffn=m.shared_ffn
    )
    ep, tokens = recipe.ep, recipe.tokens
    if not cuda:
        shape, ep, tokens = TINY_MOE[recipe.model], min(recipe.ep, ws), 16
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    dtype = torch.bfloat16 if cuda else torch.float32

    def cfg(fields):
        return moe_config(
            hidden=shape["hidden"],
            ffn=shape["ffn"],
            num_experts=shape["experts"],
            topk=shape["topk"],
            ep=ep,
            shared=shape["shared_ffn"],
            dtype=dtype,
            init_method_std=0.02,
            moe_aux_loss_coeff=m.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            # On the GPU: moe_dbrx_ep2 (1.6 B expert parameters per rank, three layers) ran past a
            # 120 s job limit (raw/s10); serial CPU normal_ draws alone take about 20 s per layer.
            cpu_init=not cuda,
            **config_fields(fields),
        )

    if not cuda:
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
            MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()  # stock builds on a CPU host
    sub = local_moe_submodules()
    torch.manual_seed(0)
    layers = {}
    for name in variants or recipe.variants:
        base = R.base_variant(name)
        if base in layers:
            layers[name] = layers[base]  # a repeat measures the same layer again
            continue
        fields = R.variant_fields(name)
        if fields.get("use_fluid_moe"):
            fields.update(R.LINK_FIELDS.get(link, {}))
            layer = FluidMoELayer(cfg(fields), submodules=sub, pg_collection=pg).to(device)
            if layers:  # the weights of the first layer built (stock's), through its state dict
                layer.load_state_dict(next(iter(layers.values())).state_dict(), strict=True)
        else:
            layer = MoELayer(cfg(fields), submodules=sub, pg_collection=pg).to(device)
        if hasattr(layer, "set_layer_number"):
            layer.set_layer_number(1)  # the router's aux-loss tracker indexes by layer
        if recipe.ddp_grads:
            layer._ddp_grad_accs = emulate_ddp_grads(layer.parameters())
        layers[name] = layer

    g = torch.Generator(device="cpu").manual_seed(7 + dist.get_rank())
    x = torch.randn(tokens, 1, shape["hidden"], generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(tokens, 1, shape["hidden"], generator=g).to(device, dtype)

    def step_of(layer):
        def step():
            reset_ddp_flags(layer.parameters())
            out, _ = layer(x)
            out.backward(dy)
            layer.zero_grad(set_to_none=True)
            x.grad = None

        return step

    steps = {name: step_of(layer) for name, layer in layers.items()}
    return layers, steps, {**shape, "ep": ep, "tokens_per_rank": tokens}


def moe_job(recipe: R.MoELayerRecipe, args, cuda, device, ws) -> dict:
    layers, steps, shape = build_moe(recipe, cuda, device, ws, link=args.link)
    res = _measure(recipe, steps, layers, args, cuda, device)
    res["shape"] = shape
    del layers, steps
    if cuda:
        torch.cuda.empty_cache()
    return res


# -- attention ----------------------------------------------------------------------------------


def attn_job(recipe: R.AttnRecipe, args, cuda, device, ws) -> dict:
    from megatron.core import parallel_state

    from fluid.testing.attention import attention_config, build_attention, pg_collection, rope_emb

    m = recipe.model_spec
    heads, groups, hd, cp, seq = m.heads, m.groups, m.head_dim, recipe.cp, recipe.seq
    if not cuda:
        t = TINY_ATTN[recipe.model]
        heads, groups, hd, cp, seq = t["heads"], t["groups"], t["head_dim"], min(recipe.cp, ws), 32
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    tp = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    dtype = torch.bfloat16 if cuda else torch.float32
    stacks = {}
    for name in recipe.variants:
        base = R.base_variant(name)
        if base in stacks:
            stacks[name] = stacks[base]
            continue
        cfg = attention_config(
            heads=heads,
            groups=groups,
            head_dim=hd,
            cp=cp,
            dtype=dtype,
            init_method_std=0.02,
            **config_fields(R.variant_fields(name)),
        )
        stack = torch.nn.ModuleList(
            build_attention("fluid", cfg, pg_collection(tp, cp_group), seed=1 + i, device=device)
            for i in range(recipe.layers)
        )
        stacks[name] = stack
    s_local, H = seq // cp, heads * hd
    g = torch.Generator(device="cpu").manual_seed(11 + dist.get_rank())
    x = torch.randn(s_local, 1, H, generator=g).to(device, dtype).requires_grad_(True)
    dy = torch.randn(s_local, 1, H, generator=g).to(device, dtype)
    emb = rope_emb(seq, hd, cp_group, device)

    def step_of(stack):
        def step():
            h = x
            for layer in stack:
                h, _ = layer(h, None, rotary_pos_emb=emb)
            h.backward(dy)
            stack.zero_grad(set_to_none=True)
            x.grad = None

        return step

    steps = {name: step_of(s) for name, s in stacks.items()}
    res = _measure(recipe, steps, stacks, args, cuda, device)
    res["shape"] = {
        "heads": heads,
        "groups": groups,
        "head_dim": hd,
        "cp": cp,
        "seq": seq,
        "layers": recipe.layers,
    }
    del stacks, steps
    if cuda:
        torch.cuda.empty_cache()
    return res


def e2e_layers_job(recipe: R.E2ERecipe, args, cuda, device, ws) -> dict:
    """The dry run of an end-to-end recipe: its model's MoE layer and attention through the
    layer path (tiny shapes), with every variant's fields. Variants that change the training
    schedule, not the layers (`*_1f1b`: Megatron's combined 1F1B), are left to their command
    line check (e2e_job.dry_run) and tests/gpu/combined_1f1b_script.py."""
    layer_variants = tuple(v for v in recipe.variants if not R.is_schedule_variant(v))
    moe = R.MoELayerRecipe(
        recipe.name + ":moe",
        recipe.model,
        "",
        nproc=recipe.nproc,
        ep=recipe.ep,
        variants=layer_variants,
    )
    attn = R.AttnRecipe(
        recipe.name + ":attn",
        recipe.model,
        "",
        nproc=recipe.nproc,
        cp=1,
        layers=1,
        variants=tuple(v for v in layer_variants if R.variant_fields(v)),
    )
    return {
        "moe": moe_job(moe, args, cuda, device, ws),
        "attn": attn_job(attn, args, cuda, device, ws),
    }


JOBS = {"moe": moe_job, "attn": attn_job, "e2e": e2e_layers_job}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", required=True, help="comma-separated recipe names, or all")
    ap.add_argument("--link", default="nvlink")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument(
        "--variants", default=None, help="comma-separated subset of the recipe's variants"
    )
    args = ap.parse_args()
    cuda = not args.dry_run
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if cuda:
        dist.init_process_group("nccl")
    else:  # a rank whose recipe raised must not leave the other waiting for 30 minutes
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    rank, ws = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    results = {}
    for recipe in R.select(args.recipes.split(",")):
        if args.variants:
            keep = tuple(v for v in recipe.variants if v in args.variants.split(","))
            recipe = dataclasses.replace(recipe, variants=keep)
        if not cuda and recipe.kind not in JOBS:
            continue
        if cuda and recipe.kind == "e2e":
            raise SystemExit(f"{recipe.name}: end-to-end recipes run through benchmarks.run")
        t0 = time.time()
        try:
            res = JOBS[recipe.kind](recipe, args, cuda, device, ws)
        except Exception:  # noqa: BLE001 - recorded; the dry run goes on with the next recipe
            if cuda:
                raise
            res = {"errors": [traceback.format_exc()]}
            print(f"[layer_job] {recipe.name} FAILED:\n{res['errors'][0]}", flush=True)
        res["wall_s"] = time.time() - t0
        results[recipe.name] = res
        if rank == 0:
            print(
                f"[layer_job] {recipe.name} {args.link}: "
                + json.dumps({k: v.get("ms") for k, v in res.get("variants", {}).items()}),
                flush=True,
            )
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
