"""Single-process reference MoE: the math FluidMoELayer must reproduce, without any parallelism.

Shape legend: T tokens (all ranks' tokens concatenated), H hidden, E experts, F expert FFN size.

`reference_moe(x_TH, router_weight_EH, w1_EFH, w2_EHF, config, shared_fn)`:
  logits = x @ Wr^T (in moe_router_dtype); probs, routing_map = Megatron's
  topk_routing_with_score_function (the same routing function TopKRouter uses, dropless, no
  expert bias); then, expert by expert, exactly SequentialMLP's MLP on the tokens routed to it,
  the probability applied after the activation, and the results summed per token; plus
  `shared_fn(x)` if given. Autograd flows to x and every weight, so tests compare gradients too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function


def reference_activation(h: torch.Tensor, config) -> torch.Tensor:
    """MLP.forward's unfused activation (GLU halves: gate rows first, then up rows)."""
    if not config.gated_linear_unit:
        return config.activation_func(h)
    x_glu, x_linear = torch.chunk(h, 2, dim=-1)
    if (val := config.activation_func_clamp_value) is not None:
        x_glu = x_glu.clamp(min=None, max=val)
        x_linear = x_linear.clamp(min=-val, max=val)
    return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)


def reference_routing(x_TH: torch.Tensor, router_weight_EH: torch.Tensor, config):
    """`(probs [T, E], routing_map [T, E] bool)` as TopKRouter.routing computes them."""
    dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(config.moe_router_dtype, x_TH.dtype)
    logits = x_TH.to(dtype) @ router_weight_EH.to(dtype).t()
    return topk_routing_with_score_function(
        logits,
        config.moe_router_topk,
        use_pre_softmax=config.moe_router_pre_softmax,
        num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor,
        score_function=config.moe_router_score_function,
    )


def reference_moe(
    x_TH: torch.Tensor,
    router_weight_EH: torch.Tensor,
    w1_EFH: torch.Tensor,
    w2_EHF: torch.Tensor,
    config,
    shared_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """`[T, H]` -> `[T, H]` (see the module docstring); w1 `[E, F1, H]`, w2 `[E, H, F]`."""
    probs, routing_map = reference_routing(x_TH, router_weight_EH, config)
    out = torch.zeros_like(x_TH)
    for e in range(w1_EFH.shape[0]):
        idx = routing_map[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h = x_TH[idx] @ w1_EFH[e].t()
        a = reference_activation(h, config)
        a = (a * probs[idx, e].unsqueeze(-1)).to(a.dtype)
        out = out.index_add(0, idx, a @ w2_EHF[e].t())
    if shared_fn is not None:
        out = out + shared_fn(x_TH)
    return out
