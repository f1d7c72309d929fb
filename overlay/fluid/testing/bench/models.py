"""The benchmark models, shared by the recipes (`benchmarks/recipes.py`), the torchtitan peer and the
tests of the FLOP formula. Test-only (fluid.testing): not part of the wheel.

Pure data; importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Model:
    """One benchmark model. `ffn` is per routed expert; `shared_ffn` the shared expert's FFN
    (Megatron `--moe-shared-expert-intermediate-size`), None for none. `grad_accum`: micro-batches
    per DP rank per iteration (global batch = micro_batch * grad_accum * DP)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    experts: int
    topk: int
    heads: int
    groups: int
    shared_ffn: Optional[int] = None
    seq: int = 4096
    vocab: int = 32000
    micro_batch: int = 1
    grad_accum: int = 8
    # The rest is the same for every model.
    normalization: str = "RMSNorm"
    activation: str = "swiglu"
    position_embedding: str = "rope"
    bias: bool = False
    tied_embeddings: bool = False
    aux_loss_coeff: float = 1e-2
    dtype: str = "bf16"
    optimizer: str = "adamw"
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def global_batch(self, dp: int) -> int:
        return self.micro_batch * self.grad_accum * dp


MODELS = {
    # Mixtral-like: 8 large experts top-2, no shared expert, GQA 32/8.
    "mixtral": Model(
        "mixtral", layers=4, hidden=4096, ffn=14336, experts=8, topk=2, heads=32, groups=8
    ),
    # Fine-grained, DeepSeek-style: 64 small experts top-6 plus one shared expert, GQA 16/4.
    "fine": Model(
        "fine",
        layers=4,
        hidden=2048,
        ffn=1408,
        experts=64,
        topk=6,
        heads=16,
        groups=4,
        shared_ffn=2816,
    ),
    # The smaller model the earlier end-to-end runs used (8 experts top-2, EP=4 on 4 GPUs).
    "small": Model(
        "small",
        layers=4,
        hidden=2048,
        ffn=5632,
        experts=8,
        topk=2,
        heads=16,
        groups=4,
        grad_accum=4,
    ),
    # Layer shapes outside the models above (MoE-layer recipes only; their attention fields are
    # unused): many tiny experts (Qwen3-30B-A3B's MoE shape), OLMoE's 64 experts top-8, and
    # DBRX-like large experts top-4, so the layer benchmark covers hidden 2048-6144, 16-128
    # experts, top-4/8 and 2048-8192 tokens per rank beyond Mixtral-like and 64-expert top-6.
    "qwen3moe": Model(
        "qwen3moe", layers=1, hidden=2048, ffn=768, experts=128, topk=8, heads=32, groups=4
    ),
    "olmoe": Model(
        "olmoe", layers=1, hidden=2048, ffn=1024, experts=64, topk=8, heads=16, groups=16
    ),
    "dbrx": Model("dbrx", layers=1, hidden=6144, ffn=10752, experts=16, topk=4, heads=48, groups=8),
}
