"""One model-FLOPs count for every framework the peers page compares (docs/benchmarks/peers.md).

Counted: the matrix multiplications of a decoder-only MoE transformer, 2 FLOPs per multiply-add,
times 3 for forward + backward (dgrad and wgrad each cost one forward):

  per token and layer
    attention projections  2*h*(q + 2*kv) + 2*q*h          q = heads*head_dim, kv = groups*head_dim (GQA)
    attention scores       2*s*q                            QK^T and PV, causal: half of 4*s*q
    routed experts         2*h*ffn*3 * topk                 SwiGLU: w1, w3 (h->ffn) and w2 (ffn->h)
    shared expert          2*h*shared_ffn*3
    router                 2*h*experts
  per token
    logits                 2*h*vocab

Not counted: norms, RoPE, softmax, activations, the loss, the optimizer, and the embedding lookup.

This is Megatron's `num_floating_point_operations` (megatron/training/training.py, the
`--log-throughput` number) for this model family plus the router GEMM, which Megatron leaves out
(0.007% of the Mixtral-like model, 0.13% of the fine-grained one). Megatron counts the scores causal,
as here; torchtitan's own `get_moe_model_nparams_and_flops` counts them full (12*s*q per token and
layer, fwd+bwd 3x included as 6*2) and counts the router, so its logged TFLOP/s differ from these.

Pure Python: `model` is any object with the fields of `fluid.testing.bench.models.Model` (layers, hidden,
ffn, experts, topk, heads, groups, shared_ffn, seq, vocab, head_dim).
"""

from __future__ import annotations

FWD_BWD = 3


def forward_flops_per_token(model, *, router: bool = True) -> float:
    """Forward FLOPs of one token (a full sequence of `model.seq` tokens attended causally)."""
    h, hd = model.hidden, model.head_dim
    q, kv = model.heads * hd, model.groups * hd
    attn_proj = 2 * h * (q + 2 * kv) + 2 * q * h
    attn_scores = 2 * model.seq * q
    routed = 2 * h * model.ffn * 3 * model.topk
    shared = 2 * h * (model.shared_ffn or 0) * 3
    gate = 2 * h * model.experts if router else 0
    per_layer = attn_proj + attn_scores + routed + shared + gate
    return float(model.layers * per_layer + 2 * h * model.vocab)


def flops_per_token(model, *, router: bool = True) -> float:
    """Training (forward + backward) FLOPs of one token."""
    return FWD_BWD * forward_flops_per_token(model, router=router)


def iteration_flops(model, tokens: int, *, router: bool = True) -> float:
    """Training FLOPs of `tokens` tokens (whole sequences of `model.seq`)."""
    return tokens * flops_per_token(model, router=router)


def tflops_per_gpu(model, tokens_per_gpu: int, seconds: float) -> float:
    """Model TFLOP/s of one GPU that trained `tokens_per_gpu` tokens in `seconds`."""
    return iteration_flops(model, tokens_per_gpu) / seconds / 1e12
