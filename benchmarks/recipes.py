"""The benchmark models and the named recipes `python -m benchmarks.run` runs.

A recipe is a typed configuration: which layer (MoE, attention) or whole model, its shape (one of
MODELS), parallelism, links, tokens and iterations, and the variants it compares. A variant is a
dict of TransformerConfig fields: the layer path passes it to TransformerConfig, the end-to-end
path turns it into `pretrain_gpt.py` flags (`--use-fluid-moe --no-fluid-scheduler`, ...).

Stock, in every recipe, is Megatron's local (Transformer-Engine-free) stack: `SequentialMLP` (a
Python loop over the local experts) and unfused `DotProductAttention`. Every job also runs
stock a second time (`stock#2`) to measure how much stock differs from itself in the same job.

Pure data plus small helpers; importable without torch (the torchtitan peer imports MODELS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

# ---------------------------------------------------------------------------------------------
# Models: fluid.testing.bench.models (shared with the torchtitan peer and the tests)
from fluid.testing.bench.models import MODELS, Model  # noqa: E402,F401

# ---------------------------------------------------------------------------------------------
# Variants: TransformerConfig fields. `stock` sets none of Fluid's.

VARIANTS = {
    "stock": {},
    "fluid_off": {"use_fluid_moe": True, "fluid_scheduler": False},  # same kernels, every dW inline
    "fluid": {"use_fluid_moe": True},  # the defaults: overlap where the link policy says so
    # Megatron's combined-1F1B schedule (one micro-batch's all-to-alls beside another's compute)
    # with Fluid's layers and with stock's; end-to-end EP recipes only (it needs EP > 1, bf16 and
    # more than one micro-batch).
    "fluid_1f1b": {"use_fluid_moe": True, "overlap_moe_expert_parallel_comm": True},
    "stock_1f1b": {"overlap_moe_expert_parallel_comm": True},
    # Fluid (overlap on / off) with several hardware queues instead of BASE_ENV's one (`_q32`).
    "fluid_q32": {"use_fluid_moe": True},
    "fluid_off_q32": {"use_fluid_moe": True, "fluid_scheduler": False},
    # Fluid deciding overlap on / off by timing both early in the run (fluid.schedule.overlap_trial)
    "fluid_measure": {"use_fluid_moe": True, "fluid_overlap": "measure"},
    # Fluid with forward pipelining: each MoE layer's dispatch and combine cut in two, one half's
    # all-to-all beside the other half's experts
    "fluid_chunks2": {"use_fluid_moe": True, "fluid_moe_chunks": 2},
    # Fluid with each bf16 dW added into the fp32 main_grad by DDP's hook, not inside the GEMM
    # (the default, auto; docs/benchmarks/breakdown.md)
    "fluid_unfused": {"use_fluid_moe": True, "fluid_wgrad_accumulation": "unfused"},
    # Fluid with torch's multi-tensor AdamW, Megatron's own fallback without TE or apex (the
    # default, auto, is torch's fused AdamW on CUDA; patch 0006)
    "fluid_foreach": {"use_fluid_moe": True, "fluid_torch_adam": "foreach"},
    # Stock and Fluid with Megatron's two torch.compile fusions that need neither Transformer
    # Engine nor apex (the weighted SwiGLU, bias-dropout-add), which the recipes otherwise turn off
    # with the TE/apex-only ones (benchmarks/e2e_job.py, JIT_FUSIONS).
    "stock_jit": {"bias_activation_fusion": True, "bias_dropout_fusion": True},
    "fluid_jit": {
        "use_fluid_moe": True,
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
    },
}

# Environment a variant needs on top of its link's: the combined schedule runs its communication
# and compute streams concurrently, which needs several hardware queues (Megatron's guidance for
# --overlap-moe-expert-parallel-comm); every other variant keeps BASE_ENV's single queue.
QUEUES_32 = {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
VARIANT_ENV = {v: QUEUES_32 for v in ("fluid_1f1b", "stock_1f1b", "fluid_q32", "fluid_off_q32")}


def variant_fields(name: str) -> dict:
    """The fields of a variant; `stock#2` (a repeat in the same job) has stock's."""
    return dict(VARIANTS[base_variant(name)])


def base_variant(name: str) -> str:
    return name.split("#")[0]


SCHEDULE_FIELDS = ("overlap_moe_expert_parallel_comm",)


def is_schedule_variant(name: str) -> bool:
    """True when the variant changes Megatron's training schedule (not only the layers)."""
    return any(f in SCHEDULE_FIELDS for f in variant_fields(name))


def is_optional_variant(name: str) -> bool:
    """True for the variants beyond stock / Fluid off / Fluid (the page shows them only where
    measured)."""
    return base_variant(name) not in ("stock", "fluid_off", "fluid")


def variant_env(name: str) -> dict:
    """Environment variables the variant sets on top of BASE_ENV and its link's."""
    return dict(VARIANT_ENV.get(base_variant(name), {}))


# Links: environment of the processes of a job. Always NCCL_NVLS_ENABLE=0 and
# CUDA_DEVICE_MAX_CONNECTIONS=1 (an all-to-all launched before a GEMM keeps its place).
LINKS = {
    "nvlink": {},
    "p2poff": {"NCCL_P2P_DISABLE": "1"},  # NCCL over host memory, ~23 GB/s: the multi-node stand-in
    "p2poff_1ch": {"NCCL_P2P_DISABLE": "1", "NCCL_MAX_NCHANNELS": "1"},  # ~9 GB/s
}
BASE_ENV = {"NCCL_NVLS_ENABLE": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# Links emulated on one GPU (fluid.comm.emulated_link): no environment, a flag on Fluid's
# variants. At EP = 1 each all-to-all is a copy plus the time half its bytes take at that rate;
# the 64-expert model's plain dispatch at 25 GB/s spends about as long in all-to-alls per step
# as the EP = 2 runs over the ~9 GB/s link with the deduplicated dispatch (256 ms against 261 ms,
# docs/benchmarks/overlap.md), 9 GB/s makes it comm-bound.
LINK_FIELDS = {
    "emul25": {"fluid_emulate_link_gbps": 25.0},
    "emul9": {"fluid_emulate_link_gbps": 9.0},
}
LINKS.update({name: {} for name in LINK_FIELDS})
SLOW_LINKS = ("p2poff", "p2poff_1ch", *LINK_FIELDS)

STOCK_SIDE = (
    "Megatron's local stack (no Transformer Engine): SequentialMLP, a Python loop over "
    "the local experts, and unfused DotProductAttention"
)

# ---------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    """Fields every recipe has. `nproc`: GPUs (= ranks) of one job; `links`: one job per link;
    `variants`: run in this order each round (alternating rounds: A B C D A B C D ...)."""

    name: str
    model: str
    what: str
    nproc: int
    links: tuple = ("nvlink",)
    variants: tuple = ("stock", "fluid_off", "fluid", "stock#2")
    stock_side: Optional[str] = STOCK_SIDE

    kind = "base"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @property
    def model_spec(self) -> Model:
        return MODELS[self.model]


@dataclass(frozen=True)
class MoELayerRecipe(Recipe):
    """One MoE layer of `model` (router, dispatcher, experts, shared expert), EP = nproc, fwd+bwd
    on `tokens` tokens per rank; `rounds` alternating rounds of `iters` timed steps (after
    `warmup`), each variant's median per round. `ddp_grads`: parameters carry Megatron DDP's fp32
    main_grad and its hook, as in training."""

    ep: int = 1
    tokens: int = 4096
    rounds: int = 5
    iters: int = 10
    warmup: int = 2
    ddp_grads: bool = True

    kind = "moe"


@dataclass(frozen=True)
class AttnRecipe(Recipe):
    """`layers` stacked self-attention layers of `model` (hidden, heads / groups, RoPE, causal)
    with Ulysses context parallelism CP = nproc over a `seq`-token sequence. Megatron's local
    stack has no context parallelism, so there is no stock side: Fluid against Fluid with the
    scheduler off only."""

    cp: int = 1
    seq: int = 32768
    layers: int = 2
    rounds: int = 5
    iters: int = 10
    warmup: int = 2
    variants: tuple = ("fluid_off", "fluid", "fluid_off#2")
    stock_side: Optional[str] = None

    kind = "attn"


@dataclass(frozen=True)
class E2ERecipe(Recipe):
    """The whole model, stock `pretrain_gpt.py` (one torchrun per variant and link) on mock data:
    EP = `ep`, context parallelism CP = `cp` (Fluid's Ulysses attention), DP = nproc / cp
    (experts: EP x expert-DP), `iters` iterations, the per-iteration median after `warmup`
    iterations. Megatron's local attention has no context parallelism: a recipe with cp > 1 has
    no stock side."""

    ep: int = 1
    iters: int = 15
    warmup: int = 5
    cp: int = 1

    kind = "e2e"

    @property
    def dp(self) -> int:
        return self.nproc // self.cp


ALL_LINKS = ("nvlink", "p2poff", "p2poff_1ch")
# Whole model with EP > 1: the combined-1F1B schedule too, Fluid's and stock's.
E2E_EP_VARIANTS = ("stock", "fluid_off", "fluid", "fluid_1f1b", "stock_1f1b", "stock#2")

_RECIPES = [
    MoELayerRecipe(
        "moe_mixtral_ep2",
        "mixtral",
        "Mixtral-like MoE layer, EP=2, 4096 tokens per rank",
        nproc=2,
        ep=2,
        links=ALL_LINKS,
    ),
    MoELayerRecipe(
        "moe_fine64_ep2",
        "fine",
        "64-expert top-6 MoE layer with a shared expert, EP=2, 4096 tokens per rank",
        nproc=2,
        ep=2,
        links=ALL_LINKS,
    ),
    MoELayerRecipe(
        "moe_fine64_ep2_16k",
        "fine",
        "64-expert top-6 MoE layer, EP=2, 16384 tokens per rank (less host-bound)",
        nproc=2,
        ep=2,
        tokens=16384,
        links=("nvlink", "p2poff"),
    ),
    MoELayerRecipe(
        "moe_mixtral_1gpu",
        "mixtral",
        "Mixtral-like MoE layer, one GPU (kernels only)",
        nproc=1,
        ep=1,
    ),
    MoELayerRecipe(
        "moe_fine64_1gpu",
        "fine",
        "64-expert top-6 MoE layer, one GPU (kernels only)",
        nproc=1,
        ep=1,
    ),
    AttnRecipe(
        "attn_cp2_16k",
        "mixtral",
        "2 attention layers, Ulysses CP=2, 16384 tokens",
        nproc=2,
        cp=2,
        seq=16384,
        links=("nvlink", "p2poff"),
    ),
    AttnRecipe(
        "attn_cp1_32k",
        "mixtral",
        "2 attention layers, one GPU (CP=1), 32768 tokens: attn_cp4_32k without context parallelism",
        nproc=1,
        cp=1,
        seq=32768,
        links=("nvlink",),
    ),
    AttnRecipe(
        "attn_cp4_32k",
        "mixtral",
        "2 attention layers, Ulysses CP=4, 32768 tokens",
        nproc=4,
        cp=4,
        seq=32768,
        links=("nvlink", "p2poff"),
    ),
    E2ERecipe(
        "e2e_mixtral_1gpu",
        "mixtral",
        "Mixtral-like model, one GPU (no communication, kernels only)",
        nproc=1,
        ep=1,
    ),
    E2ERecipe(
        "e2e_fine_1gpu",
        "fine",
        "fine-grained model, one GPU (no communication, kernels only)",
        nproc=1,
        ep=1,
    ),
    E2ERecipe(
        "e2e_fine_1gpu_emul",
        "fine",
        "fine-grained model, one GPU, the expert all-to-alls emulated as over a slow link "
        "(testing aid: no NCCL, no second rank; fluid.comm.emulated_link)",
        nproc=1,
        ep=1,
        links=("nvlink", *LINK_FIELDS),
        variants=("fluid_off", "fluid", "fluid_measure", "fluid_chunks2", "fluid_off#2"),
        stock_side=None,
    ),
    E2ERecipe(
        "e2e_mixtral_ep2",
        "mixtral",
        "Mixtral-like model, EP=2 x DP=2 on 2 GPUs",
        nproc=2,
        ep=2,
        links=ALL_LINKS,
        variants=E2E_EP_VARIANTS,
    ),
    E2ERecipe(
        "e2e_fine_ep2",
        "fine",
        "fine-grained model, EP=2 x DP=2 on 2 GPUs",
        nproc=2,
        ep=2,
        links=ALL_LINKS,
        variants=E2E_EP_VARIANTS,
    ),
    MoELayerRecipe(
        "moe_fine64_ep4",
        "fine",
        "64-expert top-6 MoE layer with a shared expert, EP=4, 4096 tokens per rank",
        nproc=4,
        ep=4,
        links=ALL_LINKS,
    ),
    E2ERecipe(
        "e2e_fine_cp2_ep2",
        "fine",
        "fine-grained model, CP=2 x EP=2 (DP=2) on 4 GPUs",
        nproc=4,
        ep=2,
        cp=2,
        links=ALL_LINKS,
        variants=("fluid_off", "fluid", "fluid_off#2"),
        stock_side=None,
    ),
    MoELayerRecipe(
        "moe_qwen3moe_ep2",
        "qwen3moe",
        "128-expert top-8 MoE layer (hidden 2048, FFN 768), EP=2, 8192 tokens per rank",
        nproc=2,
        ep=2,
        tokens=8192,
        links=ALL_LINKS,
    ),
    MoELayerRecipe(
        "moe_olmoe_ep2",
        "olmoe",
        "64-expert top-8 MoE layer (hidden 2048, FFN 1024), EP=2, 2048 tokens per rank",
        nproc=2,
        ep=2,
        tokens=2048,
        links=ALL_LINKS,
    ),
    MoELayerRecipe(
        "moe_dbrx_ep2",
        "dbrx",
        "16-expert top-4 MoE layer (hidden 6144, FFN 10752), EP=2, 4096 tokens per rank",
        nproc=2,
        ep=2,
        links=ALL_LINKS,
    ),
    E2ERecipe(
        "e2e_small_ep4",
        "small",
        "small 8-expert model, EP=4 x DP=4 on 4 GPUs",
        nproc=4,
        ep=4,
        links=ALL_LINKS,
        variants=E2E_EP_VARIANTS,
    ),
    # One GPU, the expert all-to-alls emulated (fluid.comm.emulated_link): the overlap of one MoE
    # layer per shape, Fluid against itself (stock's layers at EP = 1 send nothing).
    *[
        MoELayerRecipe(
            f"moe_{model}_1gpu_emul",
            model,
            f"{what} MoE layer, one GPU, {tokens} tokens, the all-to-alls emulated as over a slow "
            "link (testing aid: no NCCL, no second rank; fluid.comm.emulated_link)",
            nproc=1,
            ep=1,
            tokens=tokens,
            links=("nvlink", *LINK_FIELDS),
            variants=("fluid_off", "fluid", "fluid_off#2"),
            stock_side=None,
        )
        for model, what, tokens in (
            ("fine", "64-expert top-6 (shared expert)", 4096),
            ("mixtral", "Mixtral-like", 4096),
            ("qwen3moe", "128-expert top-8", 8192),
            ("olmoe", "64-expert top-8", 2048),
        )
    ],
]
RECIPES = {r.name: r for r in _RECIPES}


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise SystemExit(
            f"unknown recipe {name!r}; `python -m benchmarks.run --list` lists them"
        ) from None


def select(names) -> list:
    """Recipes by name; 'all', 'gpus=N' (every recipe of N GPUs) expand."""
    out = []
    for n in names:
        if n == "all":
            out += list(RECIPES.values())
        elif n.startswith("gpus="):
            out += [r for r in RECIPES.values() if r.nproc == int(n[5:])]
        else:
            out.append(get(n))
    seen, uniq = set(), []
    for r in out:
        if r.name not in seen:
            seen.add(r.name)
            uniq.append(r)
    return uniq


def describe(r: Recipe) -> str:
    par = {
        "moe": lambda: f"EP={r.ep}",
        "attn": lambda: f"CP={r.cp}",
        "e2e": lambda: f"EP={r.ep} DP={r.nproc}",
    }[r.kind]()
    return (
        f"{r.name:20s} {r.kind:4s} {r.nproc} GPU  {par:10s} links={','.join(r.links):25s} {r.what}"
    )


__all__ = [
    "Model",
    "MODELS",
    "VARIANTS",
    "VARIANT_ENV",
    "LINKS",
    "BASE_ENV",
    "SLOW_LINKS",
    "STOCK_SIDE",
    "Recipe",
    "MoELayerRecipe",
    "AttnRecipe",
    "E2ERecipe",
    "RECIPES",
    "get",
    "select",
    "describe",
    "variant_fields",
    "variant_env",
    "is_schedule_variant",
    "is_optional_variant",
    "base_variant",
]
