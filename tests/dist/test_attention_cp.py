"""Tier: dist. FluidSelfAttention with Ulysses CP=2 and CP=4 equals CP=1 (gloo, fp32).

Each worker builds the layer twice from Megatron's local GPT spec through
`fluid_self_attention_spec`: once over the real CP group and once over a single-rank CP group
(the CP=1 reference, computed in every process on the full sequence), with identical weights. The
CP input, rotary embedding and output gradient are sharded with Megatron's own
`get_batch_on_this_cp_rank` layout (rank r holds chunks r and 2cp-1-r of 2cp). Checked:
  - output and dX on this rank == the CP=1 ones on this rank's tokens;
  - every parameter gradient summed over the CP group (what Megatron's DP x CP gradient
    reduction does) == the CP=1 gradient;
  - scheduler on vs off: outputs and all gradients bit-identical (torch.equal);
  - the backward schedule: linear_proj's dW ran inside an all-to-all window, linear_qkv's dW
    waited for the end-of-backward flush (no later layer here).
Configurations cover MHA, GQA with cp | ng, cp > ng (KV replication), ng not divisible by cp
with ng > cp (12 heads / 6 groups on cp=4), MQA, qk-layernorm on/off, biases on/off, and
Megatron's attention_output_gate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from fluid.testing.attention import (
    attention_config,
    build_attention,
    fwd_bwd,
    megatron_shard,
    rope_angles,
)
from fluid.testing.attention import pg_collection as pgc
from tests._dist import run_distributed

# fp32 tolerance. CP and CP=1 run the same math on the same values; only the reduction order
# differs (matmul blocking on different row counts, per-head SDPA batching, and for dW the
# cross-rank sum of per-rank partial sums). Such differences are a few ulp of the *terms* times
# sqrt(#terms): relative to the largest entry of a tensor they stay below ~1e-6, while an element
# that is small through cancellation can show a larger relative error. Hence an absolute
# tolerance scaled to the tensor's largest entry (1e-5 of it) plus rtol 1e-4. A layout bug (wrong
# chunk order, head or RoPE position) changes values at O(1) of that scale: 1e5 times more.
RTOL, ATOL_REL = 1e-4, 1e-5


def assert_close(actual, expected, what):
    atol = ATOL_REL * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m} (atol {atol:.2e})"
    )


# (num_heads, num_query_groups, qk_layernorm, add_bias_linear, attention_output_gate)
CONFIGS = {
    2: [(8, 8, True, True, False), (8, 2, False, False, True), (8, 1, True, False, False)],
    4: [
        (8, 8, False, True, False),
        (8, 2, True, False, False),
        (12, 6, True, True, True),
        (8, 1, False, False, False),
    ],
}
SEQ, BATCH, HEAD_DIM = 32, 2, 8


def make_config(num_heads, num_groups, qk_layernorm, bias, cp, gate=False):
    return attention_config(
        heads=num_heads,
        groups=num_groups,
        head_dim=HEAD_DIM,
        cp=cp,
        qk_layernorm=qk_layernorm,
        bias=bias,
        gate=gate,
    )


def build_layer(config, pg, seed=1234):
    from fluid.attention import FluidSelfAttention

    layer = build_attention("fluid", config, pg, seed=seed)
    assert isinstance(layer, FluidSelfAttention)
    return layer


def _worker(rank, world_size):
    from megatron.core import parallel_state

    from fluid.attention.cp_layout import shard_sequence
    from fluid.schedule import get_backward_scheduler

    cp = world_size
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    cp_group = parallel_state.get_context_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    singles = [dist.new_group([r]) for r in range(world_size)]  # collective: every rank calls
    sched = get_backward_scheduler()
    try:
        for num_heads, num_groups, qk_ln, bias, gate in CONFIGS[cp]:
            tag = f"cp={cp} np={num_heads} ng={num_groups} qk_ln={qk_ln} bias={bias} gate={gate}"
            config = make_config(num_heads, num_groups, qk_ln, bias, cp, gate)
            ref = build_layer(config, pgc(tp_group, singles[rank]))
            fluid = build_layer(config, pgc(tp_group, cp_group), seed=99)
            fluid.load_state_dict(ref.state_dict())
            sched = fluid.scheduler  # the model's (ref and fluid share `config`, so one runtime)
            assert fluid.kv_repeat == cp // math.gcd(num_groups, cp)

            torch.manual_seed(7)
            x_full = torch.randn(SEQ, BATCH, config.hidden_size)
            g_full = torch.randn(SEQ, BATCH, config.hidden_size)
            emb_full = rope_angles(SEQ, HEAD_DIM)

            sched.enable()
            out_ref, dx_ref, grads_ref, _ = fwd_bwd(ref, x_full, emb_full, g_full)

            x = megatron_shard(x_full, cp_group)
            assert torch.equal(x, shard_sequence(x_full, cp, rank)), "layout != Megatron's"
            emb = shard_sequence(emb_full, cp, rank)  # = get_pos_emb_on_this_cp_rank's slice
            g = shard_sequence(g_full, cp, rank)

            out_on, dx_on, grads_on, stats = fwd_bwd(fluid, x, emb, g)
            sched.disable()
            out_off, dx_off, grads_off, _ = fwd_bwd(fluid, x, emb, g)
            sched.enable()

            # scheduler on/off: bit-identical (same ops, same tensors; only when dW runs differs)
            assert torch.equal(out_on, out_off), tag
            assert torch.equal(dx_on, dx_off), tag
            for n in grads_on:
                assert torch.equal(grads_on[n], grads_off[n]), f"{tag}: {n} on/off"
            # schedule: proj dW in the hp2sp window, qkv dW flushed at the end of backward
            assert stats["overlapped_dw_tasks"] == 1, (tag, stats)
            assert stats["flushed_dw_tasks"] == 1, (tag, stats)
            assert stats["pending_dw_tasks"] == 0, (tag, stats)

            # CP == CP=1
            assert_close(out_on, shard_sequence(out_ref, cp, rank), f"{tag}: output")
            assert_close(dx_on, shard_sequence(dx_ref, cp, rank), f"{tag}: dX")
            for n, gr in grads_on.items():
                total = gr.clone()
                dist.all_reduce(total, group=cp_group)
                assert_close(total, grads_ref[n], f"{tag}: d{n}")
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("cp", [2, 4])
def test_ulysses_cp_matches_cp1(cp):
    run_distributed(_worker, cp)
