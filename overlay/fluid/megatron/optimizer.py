"""Entry point called by the patched optimizer builder (patch 0006) for torch's Adam/AdamW.

Installed by overlay/pyproject.toml under the entry-point group
`megatron.core.torch_adam_kwargs_hooks`; Megatron calls it only where it falls back to torch's
optimizers (neither Transformer Engine nor apex installed) and `config.use_fluid_moe` is set.
There Megatron builds torch's AdamW with its default multi-tensor (foreach) implementation: one
`torch._foreach_*` kernel per elementwise operation of the update, each a pass over every
parameter and state tensor. TE's and apex's FusedAdam (what Megatron uses where either exists) and
torch's `fused=True` make the whole update in one pass over each tensor. `--fluid-torch-adam`
(TransformerConfig `fluid_torch_adam`) picks:

  auto     fused where every parameter is on a CUDA device, else foreach (Megatron's kwargs)
  fused    fused=True; refused, with a FluidConfigError naming the flag, where torch's fused
           kernel cannot run: a parameter that is not floating point or sits on a device without
           the kernel, `differentiable`, or `foreach` set by another hook (parameters on
           several devices run: torch groups them by device)
  foreach  Megatron's kwargs unchanged

Both compute the same update (fp32 math) in a different order of floating-point operations:
parameters and states agree to fp32 rounding (within 1e-6 relative plus 1e-7 absolute after 5
steps; tests/cpu/test_torch_adam.py states the measured bound and why). Their
state dicts have the same keys and shapes, so a checkpoint loads into either; torch keeps `step` as
an fp32 tensor on the parameter's device for fused and on the CPU for foreach, and
`Optimizer.load_state_dict` places it by the saved groups' `fused`. Note that torch's
`load_state_dict` restores every param-group entry from the checkpoint, `fused` and `foreach`
included: an optimizer resumed from a checkpoint written with the other implementation runs that
one from then on (the same update; only the speed differs).
"""

from __future__ import annotations

import logging

from fluid.config import FluidConfig, FluidConfigError, flag

logger = logging.getLogger(__name__)


def _params(kwargs: dict) -> list:
    """The parameters of torch-optimizer `params` (tensors, or param-group dicts with a
    'params' entry). A one-shot iterable is materialized into kwargs['params'] first."""
    groups = kwargs.get("params")
    if groups is None:
        return []
    if not isinstance(groups, (list, tuple)):
        groups = kwargs["params"] = list(groups)
    out = []
    for g in groups:
        if isinstance(g, dict):
            ps = g.get("params", [])
            if not isinstance(ps, (list, tuple)):
                ps = g["params"] = list(ps)
            out.extend(ps)
        else:
            out.append(g)
    return out


def resolve(mode: str, params: list) -> str:
    """`fused` or `foreach` for --fluid-torch-adam `mode` over `params` (auto: fused iff every
    parameter is on a CUDA device)."""
    if mode == "auto":
        cuda = bool(params) and all(p.device.type == "cuda" for p in params)
        return "fused" if cuda else "foreach"
    return mode


def _refuse_fused(params: list, kwargs: dict) -> None:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    fl = f"{flag('torch_adam')} fused"
    for p in params:
        if not p.is_floating_point() or p.device.type not in devices:
            raise FluidConfigError(
                f"{fl}: torch's fused Adam needs floating-point parameters on one of "
                f"{', '.join(devices)}; got a {p.dtype} parameter on {p.device.type} "
                f"(shape {tuple(p.shape)}): use {flag('torch_adam')} foreach (or auto)"
            )
    for key in ("foreach", "differentiable"):
        if kwargs.get(key):
            raise FluidConfigError(
                f"{fl}: torch's fused Adam does not run with {key}=True (set by another "
                f"torch-Adam hook or caller): use {flag('torch_adam')} foreach (or auto)"
            )


def torch_adam_kwargs(config, adam_cls, kwargs: dict) -> dict:
    """The hook: torch Adam/AdamW keyword arguments for --fluid-torch-adam; see the module
    docstring. `config`: the model's TransformerConfig; `adam_cls`: torch.optim.Adam or AdamW."""
    import torch

    mode = FluidConfig.from_config(config).torch_adam
    if not (isinstance(adam_cls, type) and issubclass(adam_cls, torch.optim.Adam)):
        if mode == "fused":
            raise FluidConfigError(
                f"{flag('torch_adam')} fused: Megatron builds {adam_cls!r}, not torch's "
                f"Adam/AdamW: use {flag('torch_adam')} auto"
            )
        return kwargs
    params = _params(kwargs)
    impl = resolve(mode, params)
    if impl == "fused":
        _refuse_fused(params, kwargs)
        kwargs["fused"] = True
    logger.info(
        "FluidMoE: %s with %s (%s %s)",
        adam_cls.__name__,
        "fused=True" if impl == "fused" else "torch's default (foreach) implementation",
        flag("torch_adam"),
        mode,
    )
    return kwargs
