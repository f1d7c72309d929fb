"""FluidTopKRouter: Megatron's TopKRouter, with the gate weight kept on the input's device.

Stock `Router.gating` moves a CPU weight to `torch.cuda.current_device()` on first use, which
cannot run on a CPU-only host (the gloo test tier). The override moves it to the *input's*
device instead; on a GPU run that is the same device, so behaviour there is unchanged. Nothing
else is touched: routing, score functions, aux / seq-aux / global-aux losses, z-loss, expert bias
and token dropping are the stock code, and parameter names (state-dict keys) are the same.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter


class FluidTopKRouter(TopKRouter):
    """TopKRouter whose `gating` follows the input's device (see the module docstring)."""

    def gating(self, input: torch.Tensor):
        """`[..., H]` -> logits `[..., E]` in `moe_router_dtype` (stock math)."""
        if self.weight.device != input.device:
            self.weight.data = self.weight.data.to(device=input.device)
        if self.bias is not None and self.bias.device != input.device:
            self.bias.data = self.bias.data.to(device=input.device)
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        return router_gating_linear(input, self.weight, self.bias, router_dtype)
