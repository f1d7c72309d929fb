"""Tier: dist (2 gloo ranks). The calls FluidMoE v0.5's documentation showed, made as documented
(docs/MIGRATION.md):

  - `get_fluid_moe_layer_spec()` without a config builds, inside a GPTModel (EP=2, moe_layer_freq
    [1, 0, 1]), the same model as `get_fluid_moe_layer_spec(config)`: the same module types under
    the same names, the same parameters (same seed), the same loss and gradients. torch.equal:
    both builds create the same modules in the same order from the same RNG state, and run the
    same ops;
  - `fluid_all_to_all_sp2hp(x, group=...)` / `fluid_all_to_all_hp2sp(x, group=...)` on v0.5's
    `[s/cp, b, heads, head_dim]` <-> `[s, b, heads/cp, head_dim]` (and a 3-D `[s/cp, b, H]`) equal
    a reference reshuffle of one global tensor, forward and backward; exact (torch.equal), since
    an all-to-all only moves data;
  - `token_dispatcher.dispatch(hidden, routing_map, probs)` and `.combine(expert_output)` give the
    staged calls' tensors (torch.equal: they are those calls) and, through the experts, the
    single-process reference MoE within fp32 summation-order tolerance (RTOL/ATOL as in
    tests/dist/test_moe_layer.py), plain and deduplicated dispatch;
  - `print_fluid_layer_info(model)` ends with the scheduler's state.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.distributed as dist

from fluid.testing.gpt import build_gpt, gpt_config
from tests._dist import run_distributed

RTOL, ATOL = 1e-4, 1e-5  # fp32, summation order only (see tests/dist/test_moe_layer.py)
SEQ, VOCAB = 16, 64


def _gpt_config():
    return gpt_config(ep=2)  # 3 layers (MoE, dense, MoE), H 32, 4 experts top-2, fp32


def _gpt(spec):
    return build_gpt(_gpt_config(), vocab=VOCAB, seq=SEQ, seed=0, spec=spec)


def _loss_and_grads(model, rank):
    g = torch.Generator().manual_seed(700 + rank)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, torch.arange(SEQ).unsqueeze(0), None, labels=labels).sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _layer_spec_body(rank, world):
    from megatron.core import parallel_state as ps

    from fluid import get_backward_scheduler, get_fluid_moe_layer_spec, print_fluid_layer_info

    ps.initialize_model_parallel(expert_model_parallel_size=world)
    try:
        explicit = _gpt(get_fluid_moe_layer_spec(_gpt_config()))
        bare = _gpt(get_fluid_moe_layer_spec())  # v0.5: no argument
        types = lambda m: [(n, type(x)) for n, x in m.named_modules()]  # noqa: E731
        assert types(bare) == types(explicit)
        kinds = [type(layer.mlp).__name__ for layer in bare.decoder.layers]
        assert kinds == ["FluidMoELayer", "MLP", "FluidMoELayer"], kinds
        assert type(bare.decoder.layers[1].self_attention).__name__ == "FluidSelfAttention"
        sd_e, sd_b = explicit.state_dict(), bare.state_dict()
        assert list(sd_b) == list(sd_e)
        for k, v in sd_e.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(sd_b[k], v), k
        loss_e, grads_e = _loss_and_grads(explicit, rank)
        loss_b, grads_b = _loss_and_grads(bare, rank)
        assert torch.equal(loss_b, loss_e)
        for n, g in grads_e.items():
            assert torch.equal(grads_b[n], g), n

        with pytest.raises(ValueError, match="pass vp_stage/pp_rank only together with a config"):
            get_fluid_moe_layer_spec(pp_rank=0)

        sched = get_backward_scheduler()
        for enabled, word in ((True, "enabled"), (False, "disabled")):
            sched.enable() if enabled else sched.disable()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rows = print_fluid_layer_info(bare, rank0_only=False)
            lines = buf.getvalue().splitlines()
            assert lines[-1].strip().startswith(f"scheduler: {word}"), lines[-1]
            assert "0 dW task(s) pending" in lines[-1], lines[-1]
            assert sum(c == "FluidMoELayer" for _, c in rows) == 2
        sched.enable()
    finally:
        ps.destroy_model_parallel()


def test_bare_layer_spec_builds_the_explicit_model():
    run_distributed(_layer_spec_body, 2)


def _ulysses_body(rank, world):
    from fluid import fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp
    from fluid.comm import CommContext

    group = dist.new_group(list(range(world)))
    s, b, heads, hd = 4 * world, 3, 2 * world, 5
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(s, b, heads, hd, generator=gen)  # the global tensor, the same on every rank
    W = torch.randn(s, b, heads, hd, generator=gen)
    seq = slice(rank * s // world, (rank + 1) * s // world)
    hs = slice(rank * heads // world, (rank + 1) * heads // world)

    # sp2hp: this rank's sequence block, all heads -> the whole sequence, this rank's heads.
    x = X[seq].clone().requires_grad_(True)
    y = fluid_all_to_all_sp2hp(x, group=group)
    assert y.shape == (s, b, heads // world, hd)
    assert torch.equal(y, X[:, :, hs])
    (y * W[:, :, hs]).sum().backward()
    assert torch.equal(x.grad, W[seq])  # each element's gradient comes back to its owner

    # hp2sp: the inverse.
    z_in = X[:, :, hs].clone().requires_grad_(True)
    z = fluid_all_to_all_hp2sp(z_in, group=group)
    assert z.shape == (s // world, b, heads, hd)
    assert torch.equal(z, X[seq])
    (z * W[seq]).sum().backward()
    assert torch.equal(z_in.grad, W[:, :, hs])

    # 3-D [s/cp, b, H]: the last dim is divided; the same data as the 4-D call's.
    x3 = X[seq].reshape(s // world, b, heads * hd)
    y3 = fluid_all_to_all_sp2hp(x3, group=group)
    assert torch.equal(y3, X[:, :, hs].reshape(s, b, -1))
    assert torch.equal(fluid_all_to_all_hp2sp(y3, group=group), x3)

    # The CommContext form is unchanged: Megatron's flattened [T, H/cp].
    flat = fluid_all_to_all_sp2hp(x3, CommContext(group))
    assert torch.equal(flat, y3.reshape(s * b, -1))
    with pytest.raises(TypeError, match="either a CommContext"):
        fluid_all_to_all_sp2hp(x3, CommContext(group), group=group)
    with pytest.raises(ValueError, match="async_op needs a CommContext"):
        fluid_all_to_all_hp2sp(y3, group=group, async_op=True)


def test_ulysses_group_form():
    run_distributed(_ulysses_body, 2)


def _ulysses_context_body(rank, world):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fluid import fluid_all_to_all_hp2sp, fluid_all_to_all_sp2hp
    from fluid.comm import CommContext
    from fluid.runtime import latest_runtime, runtime_for

    assert latest_runtime() is None  # a fresh worker: no model yet
    made = []
    real = CommContext.__post_init__

    def counting(self):
        made.append(self)
        real(self)

    CommContext.__post_init__ = counting  # type: ignore[method-assign]
    try:
        group, other = dist.new_group(list(range(world))), dist.new_group(list(range(world)))
        x = torch.randn(2, 3, 2 * world, 5, requires_grad=True)

        # Without a model: one context per group, kept for the process.
        y = fluid_all_to_all_sp2hp(x, group=group)
        fluid_all_to_all_hp2sp(y, group=group).sum().backward()
        fluid_all_to_all_sp2hp(x, group=group)
        assert len(made) == 1 and made[0].group is group, made
        fluid_all_to_all_sp2hp(x, group=other)
        assert len(made) == 2 and made[1].group is other, made

        # With a model: its runtime's context of the group (the one its layers share), whose
        # backward windows the model's scheduler fills.
        config = TransformerConfig(
            num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True
        )
        rt = runtime_for(config)
        fluid_all_to_all_hp2sp(fluid_all_to_all_sp2hp(x, group=group), group=group)
        fluid_all_to_all_sp2hp(x, group=group)
        assert len(made) == 3, made
        assert made[2] is rt.comm(group) and made[2].scheduler is rt.scheduler
    finally:
        CommContext.__post_init__ = real  # type: ignore[method-assign]


def test_ulysses_group_form_keeps_one_context_per_group():
    """Each group-form call used to build a CommContext (a CUDA stream, and on NCCL a collective
    to probe the link): two calls with one group must share one context."""
    run_distributed(_ulysses_context_body, 2)


def _dispatcher_body(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from fluid import FluidTokenDispatcher
    from fluid.moe import FluidMoELayer
    from fluid.moe.reference import reference_moe
    from fluid.testing.moe import (
        global_inputs,
        global_moe_weights,
        load_moe_weights,
        local_moe_submodules,
        moe_config,
    )

    H, FFN, E, T = 16, 8, 8, 24
    ps.initialize_model_parallel(expert_model_parallel_size=world)
    try:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        for dedup in ("off", "on"):
            cfg = moe_config(hidden=H, ffn=FFN, num_experts=E, topk=2, ep=world)
            cfg.fluid_moe_dedup = dedup
            layer = FluidMoELayer(cfg, submodules=local_moe_submodules(), pg_collection=pg)
            weights = global_moe_weights(cfg, dead_experts=(3,))
            load_moe_weights(layer, weights, rank)
            disp = layer.token_dispatcher
            assert isinstance(disp, FluidTokenDispatcher) and disp.dedup == (dedup == "on")
            x_all, _ = global_inputs(T * world, H)
            x = x_all[rank * T : (rank + 1) * T].unsqueeze(1)  # [S, B=1, H]

            with torch.no_grad():
                probs, routing_map = layer.route(x)
                # v0.5's calls, as its documentation wrote them.
                tokens, tokens_per_expert, row_probs = disp.dispatch(x, routing_map, probs)
                out_e, _ = layer.experts(tokens, tokens_per_expert, row_probs)
                y = disp.combine(out_e)
                # The staged calls they wrap.
                rows, rp = disp.dispatch_preprocess(x, routing_map, probs)
                rows, rp = disp.token_dispatch(rows, rp)
                s_tokens, s_tpe, s_probs, offs = disp.dispatch_postprocess(rows, rp)
                s_out, _ = layer.experts(s_tokens, s_tpe, s_probs, offs)
                s_y = disp.combine_postprocess(disp.token_combine(disp.combine_preprocess(s_out)))
            assert torch.equal(tokens, s_tokens) and torch.equal(row_probs, s_probs)
            assert list(tokens_per_expert) == list(s_tpe)
            assert y.shape == x.shape and torch.equal(y, s_y)

            ref = reference_moe(x_all, weights["router"], weights["w1"], weights["w2"], cfg)
            torch.testing.assert_close(
                y.squeeze(1), ref[rank * T : (rank + 1) * T], rtol=RTOL, atol=ATOL
            )
    finally:
        ps.destroy_model_parallel()


def test_token_dispatcher_dispatch_and_combine():
    run_distributed(_dispatcher_body, 2)
