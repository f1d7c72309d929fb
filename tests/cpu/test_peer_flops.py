"""fluid.testing.bench.flops: the one model-FLOPs formula of the peers page.

Checked against (1) a hand count of every GEMM of a tiny config, written out shape by shape, and
(2) Megatron's `num_floating_point_operations` (megatron/training/training.py at the pinned
Megatron-LM, transformer branch, GQA, no MLA/MTP/latent), transcribed below because
`megatron.training` is not installed in core-only mode: the two agree when the router (which
Megatron does not count) is left out.
"""

import dataclasses
from types import SimpleNamespace

import pytest

from fluid.testing.bench import flops
from fluid.testing.bench.models import MODELS, Model

TINY = Model(
    "t",
    layers=3,
    hidden=32,
    ffn=24,
    experts=4,
    topk=2,
    heads=4,
    groups=2,
    shared_ffn=48,
    seq=16,
    vocab=100,
)


def gemm(m, k, n):
    return 2 * m * k * n


def hand_count(mdl, tokens):
    """Forward FLOPs of `tokens` tokens (tokens / seq whole causal sequences), GEMM by GEMM."""
    s, h, hd = mdl.seq, mdl.hidden, mdl.head_dim
    seqs = tokens // s
    total = 0
    for _ in range(mdl.layers):
        total += gemm(tokens, h, mdl.heads * hd)  # wq
        total += 2 * gemm(tokens, h, mdl.groups * hd)  # wk, wv
        # causal scores and PV: query i attends to i+1 keys; sum over i of (i+1) ~ s^2/2 (the
        # formula uses s^2/2 exactly, as Megatron does)
        total += seqs * mdl.heads * (gemm(s, hd, s) + gemm(s, s, hd)) / 2
        total += gemm(tokens, mdl.heads * hd, h)  # wo
        total += gemm(tokens, h, mdl.experts)  # router
        total += mdl.topk * (2 * gemm(tokens, h, mdl.ffn) + gemm(tokens, mdl.ffn, h))  # w1, w3, w2
        if mdl.shared_ffn:
            total += 2 * gemm(tokens, h, mdl.shared_ffn) + gemm(tokens, mdl.shared_ffn, h)
    total += gemm(tokens, h, mdl.vocab)  # logits
    return total


def megatron_flops(args, batch_size):
    """Megatron's transformer_flops() for a GQA MoE model without MLA/MTP/latent/linear attention."""
    num_moe_layers, num_dense_layers = args.num_layers, 0
    num_experts_routed_to = args.moe_router_topk
    shared = args.moe_shared_expert_intermediate_size or 0
    fwd_bwd, fma, ffn_exp = 3, 2, 3 if args.swiglu else 2
    q = args.kv_channels * args.num_attention_heads
    k = v = args.kv_channels * args.num_query_groups
    self_attn_term = fwd_bwd * fma * (args.hidden_size * (q + k + v) + q * args.hidden_size)
    core_term = fwd_bwd * fma * q / 2 * 2
    tokens = batch_size * args.seq_length
    return (
        tokens
        * (
            fwd_bwd
            * fma
            * args.hidden_size
            * (
                args.ffn_hidden_size * ffn_exp * num_dense_layers
                + args.moe_ffn_hidden_size * num_experts_routed_to * ffn_exp * num_moe_layers
                + shared * ffn_exp * num_moe_layers
            )
            + self_attn_term * args.num_layers
            + fwd_bwd * fma * args.hidden_size * args.padded_vocab_size
        )
        + batch_size * args.seq_length**2 * core_term * args.num_layers
    )


def megatron_args(m):
    return SimpleNamespace(
        num_layers=m.layers,
        hidden_size=m.hidden,
        ffn_hidden_size=m.ffn,
        moe_ffn_hidden_size=m.ffn,
        moe_router_topk=m.topk,
        moe_shared_expert_intermediate_size=m.shared_ffn,
        swiglu=True,
        num_attention_heads=m.heads,
        num_query_groups=m.groups,
        kv_channels=m.head_dim,
        seq_length=m.seq,
        padded_vocab_size=m.vocab,
    )


def test_hand_count_tiny():
    tokens = 2 * TINY.seq
    assert flops.forward_flops_per_token(TINY) * tokens == pytest.approx(
        hand_count(TINY, tokens), rel=1e-12
    )
    assert flops.iteration_flops(TINY, tokens) == pytest.approx(
        3 * hand_count(TINY, tokens), rel=1e-12
    )


def test_no_shared_expert_drops_its_term():
    no_shared = dataclasses.replace(TINY, shared_ffn=None)
    diff = flops.forward_flops_per_token(TINY) - flops.forward_flops_per_token(no_shared)
    assert diff == TINY.layers * 2 * TINY.hidden * TINY.shared_ffn * 3


@pytest.mark.parametrize("name", ["tiny", "mixtral", "fine", "small"])
def test_matches_megatron_without_router(name):
    m = TINY if name == "tiny" else MODELS[name]
    batch = 8
    ours = flops.iteration_flops(m, batch * m.seq, router=False)
    assert ours == pytest.approx(megatron_flops(megatron_args(m), batch), rel=1e-12)
    router = 3 * 2 * m.hidden * m.experts * m.layers * batch * m.seq
    assert flops.iteration_flops(m, batch * m.seq) - ours == pytest.approx(router, rel=1e-12)


def test_mixtral_numbers():
    # 10.65 GFLOP per token: 32768 tokens per step (global batch 8 x 4096) are 349 TFLOP, so the
    # 316 TFLOP/s measured for FluidMoE is 1.10 s per step.
    m = MODELS["mixtral"]
    assert flops.flops_per_token(m) == pytest.approx(10.652e9, rel=1e-4)
    assert flops.tflops_per_gpu(m, 32768, 1.0) == pytest.approx(349.05, rel=1e-4)
