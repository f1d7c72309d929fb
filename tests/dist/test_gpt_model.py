"""Tier: dist (gloo). A whole Megatron GPTModel built from `get_fluid_moe_layer_spec` (Fluid
attention in every layer, FluidMoELayer in MoE layers per moe_layer_freq) with EP=2 on 2 ranks
equals the same model on 1 rank (EP=1) loaded with the same weights:
  - each rank's micro-batch loss equals the single-process loss of that micro-batch;
  - dense gradients summed over the 2 ranks (what DP reduction does) equal the single-process
    gradients of the two micro-batches, and each rank's expert gradients equal the single-process
    gradients of those (global) experts;
  - Megatron DDP's per-parameter hook pattern (a hook on each parameter's AccumulateGrad node)
    fires exactly once per parameter per backward, with the gradient already there: a second,
    gradient-less call is what `--overlap-grad-reduce` asserts on (it did for the expert weights);
  - the layer info lists the Fluid modules, the state-dict keys equal those of the stock local-spec
    model, the scheduler queue is empty after backward, and scheduler on/off are bit-identical;
  - the untied output layer is FluidColumnParallelLinear (patch 0005) and, scheduler on, its dW
    runs in an all-to-all window (the top MoE layer's combine backward), not at the final flush;
  - under emulated Megatron DDP (main_grad + hook) with the scheduler off, where the experts add
    their dW into main_grad themselves (fluid.moe.expert_loop), main_grad equals those gradients
    within RTOL/ATOL (not bitwise: the per-expert backward makes GEMMs of the same shapes as the
    composition, but into other buffers, and the BLAS kernel may depend on alignment; see
    tests/cpu/test_expert_loop.py).
Tolerance: fp32; the two runs do the same math with different GEMM row sets and summation order
(expert GEMMs over other token groupings, the cross-rank sum), which moves results by ~1e-6
relative; rtol 1e-4 / atol 1e-5 catches any wrong routing, layout or missing gradient (O(1e-1)).
"""

import os
import tempfile

import torch
import torch.distributed as dist

from fluid.testing.gpt import build_gpt, gpt_config
from tests._dist import run_distributed

RTOL, ATOL = 1e-4, 1e-5
SEQ, VOCAB, MB = 16, 64, 2  # sequence, vocabulary, micro-batches (one per rank at world 2)


def _config(ep):
    return gpt_config(ep=ep)  # 3 layers (MoE, dense, MoE), H 32, 4 experts top-2, fp32


def _build(ep):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    cfg = _config(ep)
    return build_gpt(cfg, vocab=VOCAB, seq=SEQ, seed=0), cfg


def _batch(mb):
    g = torch.Generator().manual_seed(500 + mb)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0)
    return tokens, pos, labels


def _loss(model, mb):
    tokens, pos, labels = _batch(mb)
    return model(tokens, pos, None, labels=labels).sum()


def _expert_key(key, ep_rank, nle):
    """Local expert key on ep_rank -> the global expert's key in the EP=1 state dict."""
    marker = ".experts.local_experts."
    if marker not in key:
        return key
    head, tail = key.split(marker)
    j, rest = tail.split(".", 1)
    return f"{head}{marker}{ep_rank * nle + int(j)}.{rest}"


def _reference(rank, world, path):
    from fluid.megatron.info import fluid_layer_info

    model, cfg = _build(ep=1)
    torch.save(model.state_dict(), path + ".weights")
    losses = []
    for mb in range(MB):
        loss = _loss(model, mb)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    info = fluid_layer_info(model)
    # The stock local-spec model's state-dict keys, for checkpoint interchange.
    stock_cfg = _config(1)
    stock_cfg.use_fluid_moe = False
    from unittest import mock

    # The stock alltoall dispatcher only stores a CUDA stream in its constructor; a placeholder
    # lets the stock model be built on CPU (it is never run) to read its state-dict keys.
    with mock.patch("torch.cuda.Stream", lambda *a, **k: None):
        stock = build_gpt(stock_cfg, vocab=VOCAB, seq=SEQ, seed=0)
    torch.save(
        {
            "losses": losses,
            "grads": grads,
            "info": info,
            "fluid_keys": sorted(model.state_dict()),
            "stock_keys": sorted(stock.state_dict()),
        },
        path,
    )


def _ddp_style_hooks(model):
    """As Megatron DDP registers them: on each parameter's AccumulateGrad node. Records, per
    parameter name, whether `param.grad` existed at each call."""
    calls, accs = {}, []
    for n, p in model.named_parameters():
        acc = p.expand_as(p).grad_fn.next_functions[0][0]

        def hook(*_, n=n, p=p):
            calls.setdefault(n, []).append(p.grad is not None)

        acc.register_hook(hook)
        accs.append(acc)  # the nodes must outlive this function, as DDP keeps them
    return calls, accs


def _ep2(rank, world, path):
    from megatron.core import parallel_state as ps

    from fluid.schedule import get_backward_scheduler

    ref = torch.load(path, weights_only=False)
    model, cfg = _build(ep=world)
    nle = cfg.num_moe_experts // world
    full = torch.load(path + ".weights", weights_only=False)
    ep_rank = ps.get_expert_model_parallel_rank()
    state = {k: full[_expert_key(k, ep_rank, nle)] for k in model.state_dict()}
    model.load_state_dict(state)

    from fluid.linear import FluidColumnParallelLinear

    # The untied output layer is Fluid's (patch 0005), its dW deferred: it is the first dW of the
    # backward and runs in the top MoE layer's combine-backward window, not at the final flush.
    assert isinstance(model.output_layer, FluidColumnParallelLinear), type(model.output_layer)
    sched = get_backward_scheduler()
    hook_calls, accs = _ddp_style_hooks(model)
    results = {}
    for enabled in (True, False):
        sched.enable() if enabled else sched.disable()
        sched.trace = []
        model.zero_grad(set_to_none=True)
        hook_calls.clear()
        loss = _loss(model, rank)
        loss.backward()
        assert sched.num_pending == 0
        out_kinds = [k for n, k in sched.trace if n == "output_layer"]
        assert out_kinds == (["overlapped"] if enabled else ["inline"]), sched.trace
        for n, _ in model.named_parameters():
            assert hook_calls.get(n) == [True], (
                f"{n}: grad-accumulator hook calls {hook_calls.get(n)}"
            )
        results[enabled] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    sched.trace = None
    # Under Megatron DDP (main_grad + its hook, emulated) with the scheduler off, the experts take
    # the per-expert backward (fluid.moe.expert_loop: per-expert GEMMs on CPU, dW inline), which
    # adds dW into main_grad itself: main_grad must equal the plain gradients within RTOL/ATOL
    # (its GEMMs write to other buffers than the composition's, which may round differently, and
    # that reaches every gradient upstream), and every parameter's hook must still fire once,
    # with a gradient present.
    from fluid.testing.moe import emulate_ddp_grads, reset_ddp_flags

    ddp_accs = emulate_ddp_grads(model.parameters())
    reset_ddp_flags(model.parameters())
    model.zero_grad(set_to_none=True)
    hook_calls.clear()
    _loss(model, rank).backward()
    for n, p in model.named_parameters():
        assert hook_calls.get(n) == [True], f"{n} under DDP: hook calls {hook_calls.get(n)}"
        assert p.grad is None, f"{n} under DDP"
        torch.testing.assert_close(p.main_grad, results[False][1][n], rtol=RTOL, atol=ATOL, msg=n)
    assert all(
        m.experts.weight1.grad_added_to_main_grad
        for m in model.modules()
        if type(m).__name__ == "FluidMoELayer"
    ), "the per-expert backward did not run"
    for p in model.parameters():
        del p.main_grad, p.grad_added_to_main_grad
    del ddp_accs
    sched.enable()
    loss, grads = results[True]
    for n, g in grads.items():  # exact: on/off run the same ops; only when dW runs differs
        assert torch.equal(g, results[False][1][n]), f"scheduler on/off differ: {n}"
    torch.testing.assert_close(loss, ref["losses"][rank], rtol=RTOL, atol=ATOL)
    for n, g in grads.items():
        if n.endswith((".experts.weight1", ".experts.weight2")):  # stacked [local experts, ...]
            ref_g = ref["grads"][n][ep_rank * nle : (ep_rank + 1) * nle]
            torch.testing.assert_close(g, ref_g, rtol=RTOL, atol=ATOL, msg=n)
        elif ".experts.local_experts." in n:
            torch.testing.assert_close(
                g, ref["grads"][_expert_key(n, ep_rank, nle)], rtol=RTOL, atol=ATOL
            )
        else:
            total = g.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref["grads"][n], rtol=RTOL, atol=ATOL, msg=n)
    if rank == 0:
        classes = {c for _, c in ref["info"]}
        assert {"FluidSelfAttention", "FluidMoELayer"} <= classes, classes
        assert sum(c == "FluidSelfAttention" for _, c in ref["info"]) == 3
        assert sum(c == "FluidMoELayer" for _, c in ref["info"]) == 2  # moe_layer_freq [1,0,1]
        assert ref["fluid_keys"] == ref["stock_keys"]


def test_gpt_model_ep2_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ref.pt")
        run_distributed(_reference, 1, path)
        run_distributed(_ep2, 2, path)
