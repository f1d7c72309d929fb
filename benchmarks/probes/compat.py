"""Probe (not a benchmark): training-loop compatibility of `--use-fluid-moe` with stock
`pretrain_gpt.py` features, each variant against stock with the same flags: checkpoint interchange
(stock -> Fluid -> stock), DDP overlap, the distributed optimizer, recompute, optimizer-checkpoint
resume, context and pipeline parallelism, deterministic mode. Speed is the benchmarks' job
(`python -m benchmarks.run`); this compares loss and grad norm.

Model: the `small` model of benchmarks/recipes.py (4 layers, hidden 2048, FFN 5632, 16 heads / 4
query groups, 8 experts top-2, seq 4096), micro-batch 1, global batch 16, bf16, local transformer
impl, EP=4 on 4 GPUs (the *_ep2 variants: 2 GPUs), mock data, fixed seed. Each variant is one
torchrun of the stock script; its log is parsed for the per-iteration lm loss, grad norm and time.

Usage (GPU host, after `source benchmarks/gpu_env.sh`):
    python -m benchmarks.probes.compat --out DIR [--iters 50] [--variants stock,fluid,...] [--p2p-disable]
    python -m benchmarks.probes.compat --print-argv    # every variant's arguments, JSON (CPU)
Writes DIR/e2e_<variant>[_p2poff].log and DIR/e2e[_p2poff].json; prints a summary table.
benchmarks/probes/compat_report.py renders docs/benchmarks/compat.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODEL = (
    "--num-layers 4 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 "
    "--group-query-attention --num-query-groups 4 --max-position-embeddings {seq} --seq-length {seq} "
    "--micro-batch-size 1 --global-batch-size 16 "
    "--num-experts 8 --moe-router-topk 2 --moe-token-dispatcher-type alltoall "
    "--moe-aux-loss-coeff 1e-2 --moe-router-load-balancing-type aux_loss "
    "--swiglu --normalization RMSNorm --position-embedding-type rope --no-rope-fusion "
    "--disable-bias-linear --untie-embeddings-and-output-weights "
    "--attention-dropout 0.0 --hidden-dropout 0.0 "
    "--bf16 --transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion "
    "--no-masked-softmax-fusion --no-bias-dropout-fusion --no-bias-swiglu-fusion "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --split 99,1,0 "
    "--lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters {warmup} --weight-decay 0.1 "
    "--clip-grad 1.0 --init-method-std 0.02 --seed 1234 "
    "--train-iters {iters} --log-interval 1 --eval-iters 0 --eval-interval 100000 "
    "--log-throughput --distributed-timeout-minutes 5"
)

# name: (extra args, parallel args, sequence length, iterations or None for --iters,
#        checkpoint to load (--finetune, no optimizer/RNG state) or None, checkpoint to save or None)
# All comparison runs start from the same weights: "init" (stock, 1 iteration) saves them, and
# every other run loads that checkpoint with --use-fluid-moe or without (checkpoint interchange
# stock -> Fluid). "fluid" saves its final weights; "stock_from_fluid" and "fluid_from_fluid"
# continue from them for a few iterations (Fluid -> stock).
EP4 = "--expert-model-parallel-size 4"
EP2 = "--expert-model-parallel-size 2"
VARIANTS = {
    "init": ("", EP4, 4096, 1, None, "ckpt_init"),
    "stock": ("", EP4, 4096, None, "ckpt_init", None),
    "fluid": ("--use-fluid-moe", EP4, 4096, None, "ckpt_init", "ckpt_fluid"),
    "stock_ep_overlap": ("--overlap-moe-expert-parallel-comm", EP4, 4096, None, "ckpt_init", None),
    "stock_from_fluid": ("", EP4, 4096, 3, "ckpt_fluid", None),
    "fluid_from_fluid": ("--use-fluid-moe", EP4, 4096, 3, "ckpt_fluid", None),
    # Training-loop compatibility, each against stock with the same flags:
    "stock_ddp_overlap": (
        "--overlap-grad-reduce --use-distributed-optimizer",
        EP4,
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_ddp_overlap": (
        "--use-fluid-moe --overlap-grad-reduce --use-distributed-optimizer",
        EP4,
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_recompute_selective": (
        "--use-fluid-moe --recompute-granularity selective",
        EP4,
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_recompute_full": (
        "--use-fluid-moe --recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
        EP4,
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_cp4_ep4_seq16k": (
        "--use-fluid-moe",
        "--expert-model-parallel-size 4 --context-parallel-size 4",
        16384,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_cp1_ep4_seq16k": ("--use-fluid-moe", EP4, 16384, None, "ckpt_init", None),
    # Optimizer-state checkpoint with Fluid (distributed optimizer): "fluid_optim_save" trains 20
    # iterations and saves model + optimizer + RNG at 10 and 20; "fluid_optim_resume" loads the
    # iteration-10 checkpoint in full (not --finetune) and trains 11..20. Its losses must equal
    # the uninterrupted run's.
    "fluid_optim_save": (
        "--use-fluid-moe --use-distributed-optimizer",
        EP4,
        4096,
        20,
        "ckpt_init",
        "ckpt_fluid_optim",
        {"save_interval": 10, "full_save": True},
    ),
    "fluid_optim_resume": (
        "--use-fluid-moe --use-distributed-optimizer --ckpt-step 10",
        EP4,
        4096,
        20,
        "ckpt_fluid_optim",
        None,
        {"full_load": True},
    ),
    # The same with Megatron's default (non-distributed) optimizer, from scratch. At the pin the
    # distributed optimizer cannot resume without apex/TE for anyone (DistributedOptimizer.state_dict
    # asserts one Adam step value, and torch Adam has no state before its first step).
    "fluid_optim_save_plain": (
        "--use-fluid-moe",
        EP4,
        4096,
        20,
        None,
        "ckpt_fluid_optim_plain",
        {"save_interval": 10, "full_save": True},
    ),
    "fluid_optim_resume_plain": (
        "--use-fluid-moe --ckpt-step 10",
        EP4,
        4096,
        20,
        "ckpt_fluid_optim_plain",
        None,
        {"full_load": True},
    ),
    # The noise floor of the loss comparison (stock against itself: a second identical run), and
    # stock's own optimizer-checkpoint resume (does stock show the iteration-12 jump of
    # fluid_optim_resume_plain? does stock's distributed optimizer resume without apex/TE?).
    "stock_repeat": ("", EP4, 4096, None, "ckpt_init", None),
    "fluid_repeat": ("--use-fluid-moe", EP4, 4096, None, "ckpt_init", None),
    # Megatron's --deterministic-mode (torch.use_deterministic_algorithms, NCCL_ALGO=Ring, cuBLAS
    # workspace): is Fluid then run-to-run reproducible, as stock is without it?
    "fluid_det": ("--use-fluid-moe --deterministic-mode", EP4, 4096, None, "ckpt_init", None),
    "fluid_det_repeat": (
        "--use-fluid-moe --deterministic-mode",
        EP4,
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "stock_optim_save_plain": (
        "",
        EP4,
        4096,
        20,
        None,
        "ckpt_stock_optim_plain",
        {"save_interval": 10, "full_save": True},
    ),
    "stock_optim_resume_plain": (
        "--ckpt-step 10",
        EP4,
        4096,
        20,
        "ckpt_stock_optim_plain",
        None,
        {"full_load": True},
    ),
    "stock_optim_save": (
        "--use-distributed-optimizer",
        EP4,
        4096,
        20,
        "ckpt_init",
        "ckpt_stock_optim",
        {"save_interval": 10, "full_save": True},
    ),
    "stock_optim_resume": (
        "--use-distributed-optimizer --ckpt-step 10",
        EP4,
        4096,
        20,
        "ckpt_stock_optim",
        None,
        {"full_load": True},
    ),
    # Pipeline parallelism (prepared, not yet run on GPU): PP=2 x EP=2, 4 layers -> 2 per stage,
    # loaded from the PP=1 initial checkpoint (torch_dist reshards).
    "stock_pp2_ep2": (
        "",
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2",
        4096,
        None,
        "ckpt_init",
        None,
    ),
    "fluid_pp2_ep2": (
        "--use-fluid-moe",
        "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2",
        4096,
        None,
        "ckpt_init",
        None,
    ),
    # On a 2-GPU host (--nproc 2): EP=2 from an EP=2 initial checkpoint. "_loop"
    # (--fluid-grouped-gemm off) takes, under Megatron DDP with dW inline (NVLink), fluid.moe.expert_loop's
    # per-expert backward, which adds each expert's dW into main_grad: checked here against real DDP.
    # "_grouped" forces torch._grouped_mm. Plain "fluid_ep2" / "fluid_ep2_ddp_overlap" use auto:
    # grouped at this model's 141 GFLOP per expert MLP (below LOOP_MIN_EXPERT_GFLOP = 400).
    "init_ep2": ("", EP2, 4096, 1, None, "ckpt_init_ep2"),
    "stock_ep2": ("", EP2, 4096, None, "ckpt_init_ep2", None),
    "fluid_ep2": ("--use-fluid-moe", EP2, 4096, None, "ckpt_init_ep2", None),
    "fluid_ep2_grouped": (
        "--use-fluid-moe --fluid-grouped-gemm on",
        EP2,
        4096,
        None,
        "ckpt_init_ep2",
        None,
    ),
    "fluid_ep2_loop": (
        "--use-fluid-moe --fluid-grouped-gemm off",
        EP2,
        4096,
        None,
        "ckpt_init_ep2",
        None,
    ),
    "fluid_ep2_loop_ddp_overlap": (
        "--use-fluid-moe --fluid-grouped-gemm off --overlap-grad-reduce --use-distributed-optimizer",
        EP2,
        4096,
        None,
        "ckpt_init_ep2",
        None,
    ),
    "stock_ep2_ddp_overlap": (
        "--overlap-grad-reduce --use-distributed-optimizer",
        EP2,
        4096,
        None,
        "ckpt_init_ep2",
        None,
    ),
    "fluid_ep2_ddp_overlap": (
        "--use-fluid-moe --overlap-grad-reduce --use-distributed-optimizer",
        EP2,
        4096,
        None,
        "ckpt_init_ep2",
        None,
    ),
    "fluid_cp2_ep2_seq16k": (
        "--use-fluid-moe",
        "--expert-model-parallel-size 2 --context-parallel-size 2",
        16384,
        30,
        "ckpt_init",
        None,
    ),
}


def variant_options(name: str) -> dict:
    """A variant's optional last field (checkpoint modes, "env"), {} when it has none."""
    return VARIANTS[name][6] if len(VARIANTS[name]) > 6 else {}


def variant_args(name: str, iters: int, ckpt_dir: Path) -> str:
    """The pretrain_gpt.py arguments of one variant (also checked on CPU: tests/cpu/test_e2e_flags.py)."""
    extra, par, seq, own_iters, load, save = VARIANTS[name][:6]
    opt = variant_options(name)
    n_iters = own_iters or iters
    # Megatron needs warm-up < decay steps: short runs (checkpoint making / continuing) skip it.
    args = MODEL.format(seq=seq, iters=n_iters, warmup=5 if n_iters > 5 else 0) + f" {par} {extra}"
    if load and opt.get("full_load"):
        args += f" --load {ckpt_dir / load}"
    elif load:
        args += f" --load {ckpt_dir / load} --finetune --no-load-optim --no-load-rng"
    if save and opt.get("full_save"):
        args += f" --save {ckpt_dir / save} --save-interval {opt['save_interval']}"
    elif save:
        # Model weights only: the comparison runs start with a fresh optimizer (--no-load-optim).
        args += f" --save {ckpt_dir / save} --save-interval {n_iters} --no-save-optim"
    return args


def run_variant(name, out: Path, iters: int, p2p_off: bool, nproc: int, ckpt_dir: Path) -> dict:
    from fluid.testing.bench.launch import parse_megatron_log, run_logged

    seq, load = VARIANTS[name][2], VARIANTS[name][4]
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_NVLS_ENABLE": "0"}
    if name == "stock_ep_overlap":
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "32"  # that feature needs several queues
    if p2p_off:
        env["NCCL_P2P_DISABLE"] = "1"
    args = variant_args(name, iters, ckpt_dir)
    script = ROOT / ".megatron" / "pretrain_gpt.py"
    if not script.exists():
        script = ROOT / "Megatron-LM" / "pretrain_gpt.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script.relative_to(ROOT)),
        *args.split(),
    ]
    tag = name + ("_p2poff" if p2p_off else "")
    log_path = out / f"e2e_{tag}.log"
    res = run_logged(cmd, env, log_path, cwd=ROOT)  # SIGTERM: the run is stopped, its log kept
    its = parse_megatron_log(log_path.read_text())
    steady = [r["ms"] for i, r in its.items() if i >= 10 and "ms" in r]
    return {
        "variant": name,
        "p2p_disabled": p2p_off,
        "rc": res["rc"],
        "wall_s": res["wall_s"],
        "seq_length": seq,
        "loaded": load,
        "median_iter_ms_after_10": statistics.median(steady) if steady else None,
        "terminated": res["terminated"],
        "iterations": its,
        "command": " ".join(cmd),
        "env": {k: env[k] for k in ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_P2P_DISABLE") if k in env},
    }


def compare(ref: dict, other: dict) -> dict:
    """Max relative difference of loss and grad norm over the iterations both logged."""
    out = {}
    for key in ("loss", "grad_norm"):
        diffs = [
            abs(other["iterations"][i][key] - r[key]) / abs(r[key])
            for i, r in ref["iterations"].items()
            if key in r and i in other["iterations"] and key in other["iterations"][i]
        ]
        out[f"max_rel_diff_{key}"] = max(diffs) if diffs else None
    if ref["median_iter_ms_after_10"] and other["median_iter_ms_after_10"]:
        out["speedup_vs_ref"] = ref["median_iter_ms_after_10"] / other["median_iter_ms_after_10"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--print-argv",
        action="store_true",
        help="print every variant's pretrain_gpt.py arguments as JSON and exit",
    )
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--variants", default="init,stock,fluid,stock_ep_overlap")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/fluid_e2e_ckpt"))
    ap.add_argument("--p2p-disable", action="store_true")
    ap.add_argument("--nproc", type=int, default=4)
    args = ap.parse_args()
    if args.print_argv:
        print(json.dumps({v: variant_args(v, args.iters, args.ckpt_dir).split() for v in VARIANTS}))
        return
    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    results = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "argv": sys.argv,
        "runs": {},
    }
    tag = "_p2poff" if args.p2p_disable else ""

    def save():  # after every variant: partial results survive a later failure
        (args.out / f"e2e{tag}.json").write_text(json.dumps(results, indent=1))

    from fluid.testing.bench.launch import Terminated, install_sigterm

    install_sigterm()
    try:
        for v in args.variants.split(","):
            r = run_variant(v, args.out, args.iters, args.p2p_disable, args.nproc, args.ckpt_dir)
            results["runs"][v] = r
            print(
                f"{v:24s} rc={r['rc']} median_ms={r['median_iter_ms_after_10']} "
                f"wall={r['wall_s']:.0f}s" + (" TERMINATED" if r["terminated"] else ""),
                flush=True,
            )
            save()
            if r["terminated"]:
                raise Terminated()
    except Terminated:
        save()
        sys.exit(128 + signal.SIGTERM)
    runs = results["runs"]
    pairs = [
        ("stock", "fluid"),
        ("stock", "stock_ep_overlap"),
        ("stock_from_fluid", "fluid_from_fluid"),
        ("fluid_cp1_ep4_seq16k", "fluid_cp2_ep2_seq16k"),
        ("fluid_cp1_ep4_seq16k", "fluid_cp4_ep4_seq16k"),
        ("stock_ddp_overlap", "fluid_ddp_overlap"),
        ("stock", "fluid_recompute_selective"),
        ("stock", "fluid_recompute_full"),
        ("fluid_optim_save", "fluid_optim_resume"),
        ("fluid_optim_save_plain", "fluid_optim_resume_plain"),
        ("stock", "stock_repeat"),
        ("stock", "stock_ddp_overlap"),
        ("fluid", "fluid_repeat"),
        ("fluid_det", "fluid_det_repeat"),
        ("stock", "fluid_det"),
        ("stock_optim_save_plain", "stock_optim_resume_plain"),
        ("stock_optim_save", "stock_optim_resume"),
        ("stock_pp2_ep2", "fluid_pp2_ep2"),
        ("stock_ep2", "fluid_ep2"),
        ("stock_ep2", "fluid_ep2_grouped"),
        ("stock_ep2", "fluid_ep2_loop"),
        ("stock_ep2_ddp_overlap", "fluid_ep2_loop_ddp_overlap"),
        ("stock_ep2", "stock_ep2_ddp_overlap"),
        ("stock_ep2_ddp_overlap", "fluid_ep2_ddp_overlap"),
    ]
    for ref, other in pairs:
        if ref in runs and other in runs:
            results[f"{other}_vs_{ref}"] = compare(runs[ref], runs[other])
    tag = "_p2poff" if args.p2p_disable else ""
    (args.out / f"e2e{tag}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
