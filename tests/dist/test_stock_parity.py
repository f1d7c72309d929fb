"""Tier: dist (gloo). A 4-layer GPTModel with Fluid layers (get_fluid_moe_layer_spec: Fluid
attention, FluidMoELayer) equals stock Megatron's local-spec model (unfused DotProductAttention,
TopKRouter, SequentialMLP) loaded with the same weights, EP=2 on 2 ranks, fp32, each rank its own
data: per-rank losses and every gradient (expert weights by their stock names), with and without
the load-balancing aux loss and z-loss.

This is the fp32 reference for tests/gpu/combined_1f1b_script.py's bf16 Fluid-vs-stock check: the
routers' gradients there differ by up to 0.22 relative (last layer), which bf16 rounding and
near-tie routing flips explain only if the two models agree in exact arithmetic, aux-loss
scaling, z-loss and token counts across EP ranks included. Measured here: every gradient within
4e-7 relative (Frobenius); bound 1e-4 (the fp32 envelope of test_gpt_model.py), a wrong scale or
count gives O(1e-2) or more.

Stock runs with the allgather dispatcher (the alltoall one needs a CUDA stream; the dispatcher
moves rows, the math is the same dropless MoE). Three CUDA-only calls of the stock path get CPU
stand-ins in the worker: `torch.cuda.current_device` (the global memory buffer of the allgather),
the unfused softmax's default causal mask, and the CUDA RNG tracker's fork (dropout is 0).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from fluid.testing.gpt import build_gpt, gpt_config
from tests._dist import run_distributed

SEQ, VOCAB, MICRO, BOUND = 64, 128, 2, 1e-4


def _config(fluid: bool, aux: bool):
    return gpt_config(
        layers=4,
        hidden=64,
        ffn=128,
        experts=8,
        moe_ffn=48,
        moe_layer_freq=1,
        fluid=fluid,
        moe_token_dispatcher_type="alltoall" if fluid else "allgather",
        moe_aux_loss_coeff=1e-2 if aux else 0.0,
        moe_z_loss_coeff=1e-3 if aux else None,
    )


def _cpu_stock_path():
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel as tensor_parallel

    torch.cuda.current_device = lambda: "cpu"
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(
        torch.ones(sq, sq), diagonal=1
    ).bool()
    tracker = types.SimpleNamespace(fork=lambda *a, **k: contextlib.nullcontext())
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: tracker


def _canonical(model):
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.detach()
        if n.endswith((".experts.weight1", ".experts.weight2")):
            head, w = n.rsplit(".", 1)
            fc = "linear_fc1" if w == "weight1" else "linear_fc2"
            for i in range(g.shape[0]):
                out[f"{head}.local_experts.{i}.{fc}.weight"] = g[i]
        else:
            out[n] = g
    return out


def _parity(rank, world, aux):
    from megatron.core import parallel_state as ps

    _cpu_stock_path()
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    results, state = {}, None
    for fluid in (True, False):
        # build_gpt: Fluid's layer spec or stock Megatron's local one, by `fluid`.
        model = build_gpt(_config(fluid, aux), vocab=VOCAB, seq=SEQ, seed=1234)
        if state is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None}
        else:
            model.load_state_dict(state, strict=False)  # _extra_state entries are None
        losses = []
        for mb in range(MICRO):
            g = torch.Generator().manual_seed(1000 * rank + mb)
            tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
            labels = torch.randint(0, VOCAB, (1, SEQ), generator=g)
            out = model(tokens, torch.arange(SEQ).unsqueeze(0), None, labels=labels)
            loss = out.float().sum()
            loss.backward()
            losses.append(loss.detach())
        results[fluid] = (torch.stack(losses), _canonical(model))
    (lf, gf), (ls, gs) = results[True], results[False]
    assert gf.keys() == gs.keys()
    lrel = float(((lf - ls).abs() / ls.abs()).max())
    assert lrel <= BOUND, f"loss rel diff {lrel:.2e}"
    errs = {n: float((gf[n] - gs[n]).norm() / gs[n].norm().clamp_min(1e-12)) for n in gs}
    bad = {n: e for n, e in errs.items() if e > BOUND}
    assert not bad, f"gradients off (rel Frobenius > {BOUND}): {sorted(bad.items())[:5]}"
    assert any("router" in n for n in errs) and any("local_experts" in n for n in errs)


@pytest.mark.parametrize("aux", [False, True], ids=["no_aux", "aux_z_loss"])
def test_fluid_gpt_equals_stock_fp32(aux):
    run_distributed(_parity, 2, aux)
