#!/usr/bin/env python3
"""torchtitan, the peer to beat: the benchmark models trained by torchtitan's own Trainer.

For each model (benchmarks.recipes.MODELS) and compile setting this script runs torchtitan's
`Trainer` (torchtitan.train) in a fresh process: torchtitan's Qwen3 decoder with MoE layers
(GQA attention through SDPA, `torch._grouped_mm` experts, optional shared expert), a flavor built
from the model's numbers, torchtitan's parallelize function (on one GPU: no sharding, bf16
autocast over fp32 parameters; at EP=N: FSDP over N ranks with EP=N for the experts, bf16
parameters and fp32 reduce), torch.compile as `--compile.enable` applies it (per block, the
grouped experts left eager), AdamW with Megatron's defaults, clip-grad, gradient accumulation.
Data are synthetic uniform tokens through torchtitan's ParallelAwareDataloader; no tokenizer.

Each step of the Trainer (`train_step`: all micro-batches, clip, optimizer) is timed with
CUDA-synchronised wall time; the median over the timed steps after the warm-up steps gives
tokens/s/GPU and model TFLOP/s per GPU by fluid.testing.bench.flops (the formula used for FluidMoE's
side too). One JSON record per model x compile setting goes to --out.

On the GPU host (wheels from tools/stage_peers.sh):
    python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl-peers/*.whl
    PYTHONPATH=/tmp/peers python3 benchmarks/peers/torchtitan/run.py --out $OUT/torchtitan.json
CPU dry run (tests/cpu/test_peer_torchtitan_dryrun.py): --device cpu --models tiny.
docs/benchmarks/peers.md: the configuration of both sides and every mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# The repository (benchmarks) and its overlay (the `fluid` package: the FLOP formula and the
# models), also where `make setup` has not installed the overlay, as on a GPU host.
SEARCH_PATH = [str(REPO), str(REPO / "overlay")]
for _p in reversed(SEARCH_PATH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.recipes import MODELS, Model  # noqa: E402
from fluid.testing.bench import flops  # noqa: E402

# A model small enough for the CPU dry run; every feature of `fine` (shared expert, GQA, top-k > 1).
TINY = Model(
    "tiny",
    layers=2,
    hidden=64,
    ffn=32,
    experts=4,
    topk=2,
    heads=4,
    groups=2,
    shared_ffn=64,
    seq=64,
    vocab=256,
    grad_accum=2,
)
ALL_MODELS = {**MODELS, "tiny": TINY}
SPEC_NAME = "fluidmoe_peer"
ROPE_THETA = 10000.0  # Megatron's --rotary-base default
NORM_EPS = 1e-5  # Megatron's --norm-epsilon default
LOAD_BALANCE_COEFF = 1e-3  # torchtitan's aux-loss-free expert-bias step (its MoEArgs default)


# ---------------------------------------------------------------------------------------------
# Model and train spec


def model_args(m: Model, *, grouped_mm: bool = True):
    """torchtitan Qwen3ModelArgs for benchmark model `m`. The shared expert is torchtitan's
    `num_shared_experts` copies of the routed expert's width fused into one FeedForward, so
    `m.shared_ffn` must be a multiple of `m.ffn` (2816 = 2 x 1408 for `fine`)."""
    shared = m.shared_ffn or 0
    if shared % m.ffn:
        raise ValueError(
            f"model {m.name}: shared_ffn {shared} is not a multiple of ffn {m.ffn}; "
            "torchtitan's shared expert is num_shared_experts * ffn wide"
        )
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3 import Qwen3ModelArgs

    return Qwen3ModelArgs(
        dim=m.hidden,
        n_layers=m.layers,
        n_heads=m.heads,
        n_kv_heads=m.groups,
        head_dim=m.head_dim,
        vocab_size=m.vocab,
        max_seq_len=m.seq,
        hidden_dim=m.ffn,
        norm_eps=NORM_EPS,
        rope_theta=ROPE_THETA,
        qk_norm=False,
        attn_type="sdpa",
        attn_mask_type="causal",
        enable_weight_tying=False,
        moe_enabled=True,
        moe_inter_dim=m.ffn,
        moe_args=MoEArgs(
            num_experts=m.experts,
            num_shared_experts=shared // m.ffn,
            top_k=m.topk,
            # Megatron's default router: softmax over the top-k logits = softmax, top-k, renormalise.
            score_func="softmax",
            route_norm=True,
            route_scale=1.0,
            gate_bias=False,
            # Megatron multiplies the expert outputs (not inputs) by the routing probabilities.
            score_before_experts=False,
            use_grouped_mm=grouped_mm,
            load_balance_coeff=LOAD_BALANCE_COEFF,
        ),
    )


class SyntheticTokens:
    """Endless uniform random sequences, as torchtitan's text datasets yield them: ({"input":
    tokens[:-1]}, tokens[1:]), `seq` tokens each; a different stream per DP rank."""

    def __init__(self, vocab: int, seq: int, dp_rank: int, seed: int = 1234):
        self.vocab, self.seq, self.seed = vocab, seq, seed + 7919 * dp_rank

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed)
        while True:
            tokens = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
            yield {"input": tokens[:-1]}, tokens[1:]


def build_synthetic_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, **_):
    """torchtitan DataLoaderBuilder: SyntheticTokens through torchtitan's ParallelAwareDataloader."""
    from dataclasses import asdict

    from torch.utils.data import IterableDataset
    from torchtitan.components.dataloader import ParallelAwareDataloader

    flavor = job_config.model.flavor
    m = ALL_MODELS[flavor]

    class _Dataset(IterableDataset):
        def __init__(self):
            self.src = SyntheticTokens(m.vocab, job_config.training.seq_len, dp_rank)

        def __iter__(self):
            return iter(self.src)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    return ParallelAwareDataloader(
        _Dataset(),
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{
            **asdict(job_config.training.dataloader),
            "batch_size": job_config.training.local_batch_size,
        },
    )


def register_spec(grouped_mm: bool = True):
    """Register the benchmark models as torchtitan flavors of one TrainSpec (Qwen3 model and
    parallelize function, MoE load-balancing optimizer, synthetic data, no tokenizer/validator)."""
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers_with_moe_load_balancing
    from torchtitan.models.qwen3 import Qwen3Model, parallelize_qwen3
    from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

    register_train_spec(
        SPEC_NAME,
        TrainSpec(
            model_cls=Qwen3Model,
            model_args={
                name: model_args(m, grouped_mm=grouped_mm) for name, m in ALL_MODELS.items()
            },
            parallelize_fn=parallelize_qwen3,
            pipelining_fn=None,
            build_optimizers_fn=build_optimizers_with_moe_load_balancing,
            build_lr_schedulers_fn=build_lr_schedulers,
            build_dataloader_fn=build_synthetic_dataloader,
            build_tokenizer_fn=None,
            build_loss_fn=build_cross_entropy_loss,
            build_validator_fn=None,
            state_dict_adapter=None,
        ),
    )


def job_args(
    m: Model,
    *,
    compile_: bool,
    ep: int,
    world: int,
    steps: int,
    dump: str,
    param_dtype: str = "float32",
) -> list[str]:
    """torchtitan CLI arguments (its JobConfig) for one run. DP = world size (FSDP when > 1)."""
    return [
        "--model.name",
        SPEC_NAME,
        "--model.flavor",
        m.name,
        "--job.dump_folder",
        dump,
        "--training.seq_len",
        str(m.seq),
        "--training.local_batch_size",
        str(m.micro_batch),
        "--training.global_batch_size",
        str(m.global_batch(world)),
        "--training.steps",
        str(steps),
        "--training.max_norm",
        str(m.clip_grad),
        "--training.dtype",
        param_dtype,
        "--training.mixed_precision_param",
        "bfloat16",
        "--training.mixed_precision_reduce",
        "float32",
        "--optimizer.name",
        "AdamW",
        "--optimizer.lr",
        str(m.lr),
        "--optimizer.beta1",
        str(m.adam_beta1),
        "--optimizer.beta2",
        str(m.adam_beta2),
        "--optimizer.eps",
        str(m.adam_eps),
        "--optimizer.weight_decay",
        str(m.weight_decay),
        "--optimizer.implementation",
        "fused",
        "--lr_scheduler.warmup_steps",
        "0",
        "--activation_checkpoint.mode",
        "none",
        "--parallelism.data_parallel_shard_degree",
        "-1",
        "--parallelism.expert_parallel_degree",
        str(ep),
        "--metrics.log_freq",
        str(max(1, steps)),
        "--debug.seed",
        "0",
        *(["--compile.enable"] if compile_ else []),
    ]


# ---------------------------------------------------------------------------------------------
# Offline shims: modules torchtitan imports at module level that the synthetic path never uses


def _stub(name: str, why: str, attrs=()) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__fluidmoe_stub__ = why

    def _missing(*a, **k):
        raise ImportError(f"{name} is not installed ({why})")

    for a in attrs:
        setattr(mod, a, _missing)

    def _getattr(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing

    mod.__getattr__ = _getattr
    return mod


def install_shims() -> list[str]:
    """Stub `datasets` (torchtitan's HF text loaders import it at module level; the synthetic
    loader does not use it) and `torch.utils.tensorboard` (metrics sink, off) when they are not
    importable. Returns the names stubbed; each stub raises ImportError if used."""
    stubbed = []
    if importlib.util.find_spec("datasets") is None:
        for name in ("datasets", "datasets.distributed"):
            sys.modules[name] = _stub(
                name, "torchtitan's HF datasets, unused by the synthetic loader"
            )
        sys.modules["datasets"].distributed = sys.modules["datasets.distributed"]
        stubbed.append("datasets")
    if importlib.util.find_spec("tensorboard") is None:
        sys.modules["torch.utils.tensorboard"] = _stub(
            "torch.utils.tensorboard", "metrics.enable_tensorboard is off", ("SummaryWriter",)
        )
        stubbed.append("torch.utils.tensorboard")
    return stubbed


class _CpuDeviceModule:
    """The slice of the torch.cuda API torchtitan's Trainer calls, for the CPU dry run."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.cpu, name)

    def set_device(self, device):
        pass

    def get_device_name(self, device=None):
        return "cpu"

    def current_device(self):
        return 0

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(total_memory=1 << 40)

    def reset_peak_memory_stats(self, *a):
        pass

    def empty_cache(self):
        pass

    def memory_stats(self, *a):
        return {}

    def synchronize(self, *a):
        pass


def use_cpu_device():
    """Point torchtitan at the CPU before its modules bind `device_type` at import. torchtitan's
    router counts tokens per expert with torch.histc on int64 indices, which CUDA has and the CPU
    lacks (CUDA returns the counts in the input dtype): on the CPU they are counted in float32
    (exact below 2**24) and returned as int64. The grouped-mm
    experts pad their token groups with a Triton kernel; torchtitan's own CPU version of it
    (`use_cpu=True`) takes its place."""
    import functools

    import torch
    import torchtitan.models.moe.utils as tt_moe_utils
    import torchtitan.tools.utils as tt_utils

    tt_moe_utils.generate_permute_indices = functools.partial(
        tt_moe_utils.generate_permute_indices, use_cpu=True
    )
    cpu_module = _CpuDeviceModule()
    tt_utils.device_type, tt_utils.device_module = "cpu", cpu_module
    for name, mod in list(
        sys.modules.items()
    ):  # those imported with the package bound them already
        if name.startswith("torchtitan") and getattr(mod, "device_type", None) == "cuda":
            mod.device_type = "cpu"
            if hasattr(mod, "device_module"):
                mod.device_module = cpu_module
    histc = torch.histc

    def histc_cpu(x, *args, **kwargs):
        if x.device.type == "cpu" and not x.is_floating_point():
            return histc(x.float(), *args, **kwargs).to(x.dtype)
        return histc(x, *args, **kwargs)

    torch.histc = histc_cpu


# ---------------------------------------------------------------------------------------------
# One run (a child process)


def run_one(a) -> dict:
    import torch

    m = ALL_MODELS[a.model]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    stubbed = install_shims()
    if a.device == "cpu":
        use_cpu_device()
    import torchtitan
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import Trainer

    init_logger()
    register_spec(grouped_mm=a.grouped_mm)
    steps = a.warmup + a.steps
    dump = tempfile.mkdtemp(prefix="tt-peer-")
    args = job_args(
        m,
        compile_=a.compile,
        ep=a.ep,
        world=world,
        steps=steps,
        dump=dump,
        param_dtype=a.param_dtype,
    )
    if a.device == "cpu":
        args = [x if x != "fused" else "foreach" for x in args]
    config = ConfigManager().parse_args(args)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    times: list[float] = []

    class TimedTrainer(Trainer):
        def train_step(self, data_iterator):
            sync()
            t0 = time.perf_counter()
            super().train_step(data_iterator)
            sync()
            times.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    trainer = TimedTrainer(config)
    t_built = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    timed = times[a.warmup :]
    med = statistics.median(timed)
    tokens_gpu = m.seq * m.micro_batch * m.grad_accum  # per GPU per step
    rec = {
        "framework": "torchtitan",
        "model": m.name,
        "compile": a.compile,
        "param_dtype": a.param_dtype,
        "ep": a.ep,
        "world_size": world,
        "global_batch": m.global_batch(world),
        "grad_accum": m.grad_accum,
        "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "torchtitan": torchtitan.__version__,
        "stubbed_modules": stubbed,
        "config": {
            "model": dataclasses.asdict(m),
            "torchtitan_args": args,
            "grouped_mm": a.grouped_mm,
            "load_balance_coeff": LOAD_BALANCE_COEFF,
            "rope_theta": ROPE_THETA,
        },
        "warmup_steps": a.warmup,
        "step_times_s": times,
        "step_time_median_s": med,
        "step_time_min_s": min(timed),
        "tokens_per_step_per_gpu": tokens_gpu,
        "tokens_per_s_per_gpu": tokens_gpu / med,
        "flops_per_token": flops.flops_per_token(m),
        "tflops_per_gpu": flops.tflops_per_gpu(m, tokens_gpu, med),
        "build_s": t_built - t_start,
        "total_s": time.perf_counter() - t_start,
    }
    if a.device == "cuda":
        rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if a.record and rank == 0:
        Path(a.record).write_text(json.dumps(rec, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rec


# ---------------------------------------------------------------------------------------------
# Driver


def launch(model: str, compile_: bool, a, record: str, param_dtype: str) -> list[str]:
    child = [
        str(Path(__file__).resolve()),
        "--child",
        "--model",
        model,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--ep",
        str(a.ep),
        "--device",
        a.device,
        "--record",
        record,
        "--param-dtype",
        param_dtype,
        *(["--compiled"] if compile_ else []),
        *([] if a.grouped_mm else ["--no-grouped-mm"]),
    ]
    if a.nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={a.nproc}",
            *child,
        ]
    return [sys.executable, *child]


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def run_child(mdl: str, comp: bool, a, env: dict, param_dtype: str, log_path) -> dict:
    """One run in a fresh process (torchrun when nproc > 1); its record, or an error record."""
    with tempfile.TemporaryDirectory() as td:
        record = os.path.join(td, "record.json")
        cmd = launch(mdl, comp, a, record, param_dtype)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                env=env,
                timeout=a.timeout_compile if comp else a.timeout,
                capture_output=True,
                text=True,
            )
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", _text(e.stdout) + _text(e.stderr)
        wall = time.perf_counter() - t0
        if log_path:
            Path(log_path).write_text(log)
        if rc == 0 and os.path.exists(record):
            rec = json.loads(Path(record).read_text())
        else:
            tail = "\n".join(log.strip().splitlines()[-40:])
            rec = {
                "framework": "torchtitan",
                "model": mdl,
                "compile": comp,
                "ep": a.ep,
                "world_size": a.nproc,
                "param_dtype": param_dtype,
                "error": str(rc),
                "oom": "out of memory" in log.lower() or "OutOfMemoryError" in log,
                "log_tail": tail,
            }
        rec["wall_s"] = wall
        return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mixtral,fine", help="comma list of " + ",".join(ALL_MODELS))
    p.add_argument(
        "--compile",
        default="off,on",
        help="comma list of off,on (torch.compile); every model runs with the first, then the next",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compile happens here)"
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="GPUs (processes); DP = FSDP degree = nproc"
    )
    p.add_argument("--ep", type=int, default=None, help="expert parallel degree (default: nproc)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--no-grouped-mm",
        dest="grouped_mm",
        action="store_false",
        help="torchtitan's for-loop experts instead of torch._grouped_mm",
    )
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="torchtitan --training.dtype: parameters, gradients and AdamW states "
        "(float32 = bf16 compute with fp32 master weights, as Megatron)",
    )
    p.add_argument(
        "--oom-fallback",
        action="store_true",
        help="rerun a float32 run that ran out of memory with --param-dtype bfloat16",
    )
    p.add_argument(
        "--timeout", type=float, default=120, help="seconds per eager run before it is killed"
    )
    p.add_argument(
        "--timeout-compile",
        type=float,
        default=200,
        help="seconds per torch.compile run (compilation included) before it is killed",
    )
    p.add_argument("--out", default="torchtitan_peer.json")
    p.add_argument("--logs", default=None, help="folder for each run's full log")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ep is None:
        a.ep = a.nproc
    if a.child:
        a.compile = a.compiled
        run_one(a)
        return 0

    runs = [(mdl, c == "on") for c in a.compile.split(",") for mdl in a.models.split(",")]
    for mdl, _ in runs:
        if mdl not in ALL_MODELS:
            p.error(f"unknown model {mdl}; one of {', '.join(ALL_MODELS)}")
    if a.logs:
        os.makedirs(a.logs, exist_ok=True)
    base_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*SEARCH_PATH, os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "PYTHONUNBUFFERED": "1",
        "NCCL_NVLS_ENABLE": "0",
        "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF", "expandable_segments:True"),
    }
    records = []
    for i, (mdl, comp) in enumerate(runs):
        env = dict(base_env)
        if a.nproc == 1:
            env.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(29517 + i),
            )
        dtypes = [a.param_dtype] + (
            ["bfloat16"] if a.oom_fallback and a.param_dtype == "float32" else []
        )
        for dt in dtypes:
            name = f"{mdl}_compile-{'on' if comp else 'off'}_np{a.nproc}_ep{a.ep}_{dt}"
            print(f"== torchtitan peer: {name}", flush=True)
            log_path = os.path.join(a.logs, name + ".log") if a.logs else None
            rec = run_child(mdl, comp, a, env, dt, log_path)
            records.append(rec)
            Path(a.out).write_text(json.dumps(records, indent=1))
            if "error" not in rec:
                print(
                    f"   {rec['step_time_median_s']:.3f} s/step, {rec['tokens_per_s_per_gpu']:.0f} "
                    f"tokens/s/GPU, {rec['tflops_per_gpu']:.1f} TFLOP/s/GPU, peak reserved "
                    f"{rec.get('peak_reserved_gib', 0):.1f} GiB ({rec['wall_s']:.0f} s)",
                    flush=True,
                )
                break
            print(
                f"   FAILED ({rec['error']}, {rec['wall_s']:.0f} s):\n{rec['log_tail']}", flush=True
            )
            if not rec["oom"]:
                break
    ok = sum("error" not in r for r in records)
    print(f"torchtitan peer: {ok} of {len(records)} runs ok -> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
