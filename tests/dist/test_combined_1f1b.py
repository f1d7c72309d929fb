"""Tier: dist (gloo). Fluid layers under Megatron's combined-1F1B schedule
(`--overlap-moe-expert-parallel-comm`): a tiny GPTModel (Fluid attention in every layer,
FluidMoELayer in MoE layers, EP=2 on 2 ranks) trained for 3 micro-batches through
`forward_backward_no_pipelining`, once with the plain schedule and once with the combined one
(forward of micro-batch i+1 interleaved, node by node, with the backward of micro-batch i), same
weights, same data:
  - the per-micro-batch losses and every parameter's gradient are bitwise equal;
  - under emulated Megatron DDP (`main_grad` plus a hook on each parameter's AccumulateGrad, as
    `--overlap-grad-reduce` uses it) every hook fires exactly once per micro-batch with the
    gradient present, and `main_grad` is bitwise equal as well;
  - the BackwardScheduler's queue is empty after each schedule (no dW lost between nodes).
The middle layer of the three is scheduled against itself (forward layer i beside backward layer
n-1-i), which exercises the dispatcher state across an interleaved backward of the same layer.

Why bitwise: per micro-batch both schedules run the same ops on the same tensors in the same order
within each layer (route, permute, all-to-all, experts, all-to-all, unpermute); the combined
schedule only cuts the autograd graph at the node boundaries (detach / run_backward per node) and
interleaves two micro-batches. Gradient accumulation into `param.grad` happens per micro-batch in
the same micro-batch order. Megatron's own test of this schedule (tests/unit_tests/a2a_overlap)
is bitwise as well, except the embedding and output layer; here the embeddings are untied and
they compare bitwise too. Should a CPU kernel ever round differently for a differently strided
input, the failure names the parameter; the tolerance would then be the fp32 envelope of
tests/dist/test_gpt_model.py (rtol 1e-4, atol 1e-5).

CPU stand-in for CUDA streams (`cpu_stream_shim`): the schedule puts every node on a CUDA stream
with a CUDA event; on CPU, work is synchronous, so the shim turns stream/event calls into no-ops
(and `forward_backward_no_pipelining`'s one `device="cuda"` token counter into a CPU one). What is
tested is everything but the concurrency: the node split of the Fluid layers (stage methods),
detach boundaries, the schedule's `free_input` storage release (a freed tensor that Fluid saved
for backward would fail here), per-node backward calls with the dW queue, interleaving order and
gradient accumulation. The concurrency and the step time are measured by
tests/gpu/combined_1f1b_script.py.

The config field is set after construction: TransformerConfig refuses
`overlap_moe_expert_parallel_comm` without bf16/fp16 (a GPU-speed constraint, not a correctness
one), and this test runs in fp32 to keep bitwise comparisons meaningful.
"""

from __future__ import annotations

import contextlib
import types

import torch

from fluid.testing.gpt import build_gpt, gpt_config
from tests._dist import run_distributed

SEQ, VOCAB, MICRO = 16, 64, 3


class _Event:
    def __init__(self, *a, **k):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _Event()

    @staticmethod
    def priority_range():
        return (0, -1)


def cpu_stream_shim():
    """Make the schedule's CUDA stream/event calls no-ops in this (CPU-only) process."""
    import megatron.core.pipeline_parallel.schedules as schedules

    torch.cuda.Event = _Event
    torch.cuda.Stream = _Stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.Tensor.record_stream = lambda self, stream: None

    real_torch = torch

    class _SchedulesTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real_torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):  # the token counter of the no-pipelining loop
            return real_torch.zeros(*args, **kwargs)

    schedules.torch = _SchedulesTorch("torch")


def _config():
    return gpt_config(ep=2)  # 3 layers (MoE, dense, MoE), H 32, 4 experts top-2, fp32


def _build():
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(expert_model_parallel_size=2)
    cfg = _config()
    cfg.overlap_moe_expert_parallel_comm = True  # see the module docstring
    return build_gpt(cfg, vocab=VOCAB, seq=SEQ, seed=0), cfg


def _batches(rank):
    out = []
    for mb in range(MICRO):
        g = torch.Generator().manual_seed(1000 * rank + mb)
        out.append(
            {
                "tokens": torch.randint(0, VOCAB, (1, SEQ), generator=g),
                "labels": torch.randint(0, VOCAB, (1, SEQ), generator=g),
                "position_ids": torch.arange(SEQ).unsqueeze(0),
            }
        )
    return out


def _loss_func(output_tensor):
    loss = output_tensor.float().sum()
    num_tokens = torch.tensor(output_tensor.numel(), dtype=torch.int)
    return loss, num_tokens, {"lm loss": loss.detach().clone()}


_PLANS = []  # micro-batches that went through build_schedule_plan (the combined path)


def _forward_step(data_iterator, model, return_schedule_plan: bool = False):
    b = next(data_iterator)
    kwargs = dict(labels=b["labels"])
    if return_schedule_plan:
        _PLANS.append(1)
        plan = model.build_schedule_plan(b["tokens"], b["position_ids"], None, **kwargs)
        return plan, _loss_func
    return model(b["tokens"], b["position_ids"], None, **kwargs), _loss_func


def _run(model, cfg, rank, combined: bool):
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from fluid.schedule import get_backward_scheduler

    cfg.overlap_moe_expert_parallel_comm = combined
    _PLANS.clear()
    store = forward_backward_no_pipelining(
        forward_step_func=_forward_step,
        data_iterator=iter(_batches(rank)),
        model=[model],
        num_microbatches=MICRO,
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    assert len(_PLANS) == (MICRO if combined else 0), "the combined schedule did not run"
    assert get_backward_scheduler().num_pending == 0
    return [d["lm loss"] for d in store]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hooks(model):
    """Megatron DDP's pattern: a hook on each parameter's AccumulateGrad node; records whether
    `param.grad` existed at each call."""
    calls, accs = {}, []
    for n, p in model.named_parameters():
        acc = p.expand_as(p).grad_fn.next_functions[0][0]

        def hook(*_, n=n, p=p):
            calls.setdefault(n, []).append(p.grad is not None)

        acc.register_hook(hook)
        accs.append(acc)
    return calls, accs


def _combined_equals_plain(rank, world):
    cpu_stream_shim()
    from fluid.testing.moe import emulate_ddp_grads, reset_ddp_flags

    model, cfg = _build()
    calls, accs = _hooks(model)
    results = {}
    for combined in (False, True):
        model.zero_grad(set_to_none=True)
        calls.clear()
        losses = _run(model, cfg, rank, combined)
        for n, _ in model.named_parameters():
            assert calls.get(n) == [True] * MICRO, f"{n}: hook calls {calls.get(n)} ({combined=})"
        results[combined] = (losses, _grads(model))
    (l0, g0), (l1, g1) = results[False], results[True]
    assert len(l0) == len(l1) == MICRO
    for i, (a, b) in enumerate(zip(l0, l1, strict=True)):
        assert torch.equal(a, b), f"micro-batch {i}: loss {a.item()} plain vs {b.item()} combined"
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for n in g0:
        assert torch.equal(g0[n], g1[n]), (
            f"{n}: max |diff| {(g0[n] - g1[n]).abs().max().item():.3e}"
        )

    # Emulated Megatron DDP (main_grad + hook), both schedules: main_grad bitwise equal.
    ddp_accs = emulate_ddp_grads(model.parameters())
    main = {}
    for combined in (False, True):
        reset_ddp_flags(model.parameters())
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.main_grad.zero_()
        _run(model, cfg, rank, combined)
        main[combined] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    for n in main[False]:
        assert torch.equal(main[False][n], main[True][n]), f"{n}: main_grad differs"
    del ddp_accs, accs


def test_combined_1f1b_equals_plain_schedule():
    run_distributed(_combined_equals_plain, 2)


def test_combined_1f1b_needs_one_chunk():
    """The schedule calls the stages one at a time (no chunked pipelining): refused at build
    time, naming the flag."""
    import pytest

    from fluid.config import FluidConfigError
    from fluid.megatron.validate import validate_config

    cfg = _config()
    validate_config(cfg)  # plain schedule, chunks 1
    cfg.overlap_moe_expert_parallel_comm = True
    validate_config(cfg)  # combined, chunks 1
    cfg.fluid_moe_chunks = 2
    with pytest.raises(FluidConfigError, match="--fluid-moe-chunks 1"):
        validate_config(cfg)
    cfg.overlap_moe_expert_parallel_comm = False
    validate_config(cfg)  # chunks 2 without the schedule


def _cpu_offsets(counts, device):
    """offsets_for as on the GPU: an int32 tensor (made on the current stream), never None."""
    acc, out = 0, []
    for c in counts:
        acc += int(c)
        out.append(acc)
    return torch.tensor(out, dtype=torch.int32)


def _stream_order(rank, world):
    """Stream ordering of the combined schedule, checked with fake streams (tests/_streams.py).

    CPU runs Handoff's CUDA path (`_on_cuda` patched), offsets are tensors as on the GPU, the
    experts keep them (grouped-GEMM path chosen) and the grouped GEMMs read them (the loop's
    `gmm` / `gmm_wgrad` read `offs` first, as the grouped kernel does). Before fluid.moe.handoff
    the checker reports the offsets (made on the comm stream, freed while the experts' backward
    on the compute stream still reads them) and sorted_indices (made on the compute stream,
    freed while the unpermute backward on the comm stream reads them)."""
    import gc

    import fluid.moe.dispatcher as dispatcher
    import fluid.moe.experts as experts
    import fluid.moe.grouped_gemm as gg
    import fluid.moe.handoff as handoff
    from tests._streams import StreamOrderChecker, cpu_schedules_torch, install_fake_streams

    checker = StreamOrderChecker()
    install_fake_streams(checker)
    cpu_schedules_torch()
    handoff._on_cuda = lambda t: t is not None
    dispatcher.offsets_for = _cpu_offsets
    experts.use_grouped_mm = lambda *a, **k: True
    real_gmm, real_wgrad = gg.gmm, gg.gmm_wgrad
    reads = []

    def gmm(a, w, counts, offs, **kw):
        reads.append(offs.clone())  # the grouped kernel reads offs on the current stream
        return real_gmm(a, w, counts, offs, **kw)

    def gmm_wgrad(dy, x, counts, offs, *args, **kw):
        reads.append(offs.clone())
        return real_wgrad(dy, x, counts, offs, *args, **kw)

    gg.gmm, gg.gmm_wgrad = gmm, gmm_wgrad
    model, cfg = _build()
    with checker:
        for combined in (False, True):
            model.zero_grad(set_to_none=True)
            _run(model, cfg, rank, combined)
        gc.collect()
    assert reads, "the grouped GEMMs never read offs: the check saw nothing"
    sources = sorted({v.split("storage from ")[1].split(",")[0] for v in checker.violations})
    assert not checker.violations, "\n".join(sources + checker.violations[:4])


def test_combined_1f1b_stream_order():
    """Every tensor Fluid keeps between the schedule's nodes is read after its producer's event
    and freed only once no other stream still reads it (fake streams; see _stream_order)."""
    run_distributed(_stream_order, 2)
