#!/usr/bin/env python3
"""A Mixtral-like MoE GPT built programmatically with FluidMoE layers, trained for a few steps.

Only the public API is used: `fluid.get_fluid_moe_layer_spec` (the decoder block spec with
FluidSelfAttention in every layer and FluidMoELayer in every MoE layer), `get_backward_scheduler`
(its per-step counters), `print_status` and `print_fluid_layer_info`; the rest is megatron.core
(parallel_state, TransformerConfig, GPTModel) and torch.optim.AdamW.

    # GPUs: NCCL, bf16 parameters (fp32 master copies in the optimizer), RoPE
    CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 \
        torchrun --nproc-per-node 4 examples/pretrain_moe.py --steps 20
    # CPU: gloo, fp32, learned absolute positions (Megatron's RoPE moves its tables to CUDA)
    torchrun --nproc-per-node 2 examples/pretrain_moe.py --device cpu --steps 3

Parallelism: expert parallel EP = --ep (default: the world size), data parallel over all ranks
for the dense weights, over world/EP ranks for the experts; TP = PP = CP = 1. Gradients are
averaged by hand (all-reduce over Megatron's data-parallel and expert-data-parallel groups) so
the example runs on gloo too; `pretrain_gpt.py --use-fluid-moe` (see run_mixtral_8x7b.sh) uses
Megatron's DDP and distributed optimizer instead.

Data: a synthetic language with a learnable rule, next = (3 * token + 1) mod vocab, starting
from random tokens, fresh each step and rank; the loss falls from ln(vocab) within a few steps.
Output on rank 0, one line per step:
    step 1/3 | loss 4.2 | ms 210.3 | sched total_dw_tasks=... overlapped_dw_tasks=... a2a_calls=...
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist

# CPU defaults are tiny (CI runs this on 2 cores); GPU defaults are a small Mixtral-like shape.
SIZES = {
    "cpu": dict(
        layers=2, hidden=64, ffn=128, heads=4, groups=2, experts=4, seq=32, mbs=2, vocab=128
    ),
    "cuda": dict(
        layers=4, hidden=2048, ffn=5632, heads=16, groups=4, experts=8, seq=2048, mbs=2, vocab=32000
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: world)")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 (cpu), 3e-4 (cuda)")
    p.add_argument("--seed", type=int, default=1234)
    for k in SIZES["cpu"]:
        p.add_argument(
            f"--{k}",
            type=int,
            default=None,
            help=f"default {SIZES['cpu'][k]} (cpu), {SIZES['cuda'][k]} (cuda)",
        )
    args = p.parse_args()
    for k, v in SIZES[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = 3e-3 if args.device == "cpu" else 3e-4
    return args


def init_distributed(args):
    """Default group (nccl or gloo) and Megatron's model-parallel groups with EP."""
    from megatron.core import parallel_state as ps

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    else:
        torch.set_num_threads(1)
    args.ep = args.ep or world
    ps.initialize_model_parallel(expert_model_parallel_size=args.ep)
    torch.manual_seed(args.seed)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)  # the RNG tracker Megatron's layers fork from


def build_model(args):
    """GPTModel with the Fluid decoder block spec; returns (model, config)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fluid import get_fluid_moe_layer_spec

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type="alltoall",  # FluidMoELayer replaces this dispatcher
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        expert_model_parallel_size=args.ep,
        gated_linear_unit=True,  # SwiGLU
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bf16=cuda,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,  # needs apex / TE
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        use_fluid_moe=True,  # the config field of patch 0001; the spec below does the swap
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_fluid_moe_layer_spec(config, use_transformer_engine=False),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        position_embedding_type="rope" if cuda else "learned_absolute",
        rotary_base=1000000,
        share_embeddings_and_output_weights=False,
    )
    if cuda:
        model.cuda()
    return model, config


def batch(args, step, device):
    """tokens, position ids, labels `[mbs, seq]`: next = (3 * token + 1) mod vocab."""
    g = torch.Generator().manual_seed(args.seed + 1000 * step + dist.get_rank())
    seq = torch.empty(args.mbs, args.seq + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, args.vocab, (args.mbs,), generator=g)
    for t in range(args.seq):
        seq[:, t + 1] = (3 * seq[:, t] + 1) % args.vocab
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.mbs, -1)
    return seq[:, :-1].to(device), pos.to(device), seq[:, 1:].to(device)


class MasterAdamW:
    """AdamW on fp32 copies of the (bf16 or fp32) model parameters, with data-parallel averaging.

    Gradients of dense parameters are averaged over the data-parallel group (every rank sees
    different data); expert parameters (`allreduce = False`, set by the expert layers) over the
    expert-data-parallel group (world / EP ranks hold the same experts).
    """

    def __init__(self, model, lr):
        from megatron.core import parallel_state as ps

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().clone().float() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        self.groups = [
            ps.get_data_parallel_group()
            if getattr(p, "allreduce", True)
            else ps.get_expert_data_parallel_group()
            for p in self.params
        ]

    def step(self):
        for p, m, group in zip(self.params, self.master, self.groups, strict=True):
            g = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            if dist.get_world_size(group) > 1:
                dist.all_reduce(g, group=group)
                g /= dist.get_world_size(group)
            m.grad = g
        torch.nn.utils.clip_grad_norm_(self.master, 1.0)  # local norm: fine for an example
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                p.copy_(m)
                p.grad = None


def main():
    args = parse_args()
    init_distributed(args)
    from fluid import get_backward_scheduler, print_fluid_layer_info, print_status

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else "cpu"
    if rank == 0:
        print_status()
        print(
            f"world={dist.get_world_size()} EP={args.ep} device={args.device} "
            f"ln(vocab)={math.log(args.vocab):.3f}",
            flush=True,
        )
    model, _ = build_model(args)
    print_fluid_layer_info(model)  # rank 0 prints
    opt = MasterAdamW(model, args.lr)
    sched = get_backward_scheduler()
    model.train()
    for step in range(1, args.steps + 1):
        tokens, pos, labels = batch(args, step, device)
        sched.reset_stats()
        t0 = time.perf_counter()
        per_token = model(tokens, pos, None, labels=labels)  # [mbs, seq] cross entropy
        loss = per_token.float().mean()
        loss.backward()  # Fluid all-to-alls run queued dW in their windows; the rest flushes here
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        stats = sched.get_stats()  # after the step: every dW has run (pending_dw_tasks == 0)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        avg /= dist.get_world_size()
        if rank == 0:
            keys = (
                "total_dw_tasks",
                "overlapped_dw_tasks",
                "after_wait_dw_tasks",
                "flushed_dw_tasks",
                "inline_dw_tasks",
                "pending_dw_tasks",
                "a2a_calls",
                "overlapped_windows",
            )
            extra = "".join(
                f" {k}={stats[k]:.3f}"
                for k in ("a2a_ms", "dw_in_window_ms", "window_ms")
                if stats.get(k) is not None
            )
            print(
                f"step {step}/{args.steps} | loss {avg.item():.4f} | ms {ms:.1f} | sched "
                + " ".join(f"{k}={stats[k]}" for k in keys)
                + extra,
                flush=True,
            )
    if rank == 0:
        print("done", flush=True)
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
