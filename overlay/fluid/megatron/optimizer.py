"""Entry point called by the patched optimizer builder (patch 0006) for torch's Adam/AdamW.

Installed by overlay/pyproject.toml under the entry-point group `megatron.core.torch_adam_hooks`;
Megatron calls it only where it falls back to torch's optimizers (neither Transformer Engine nor
apex installed) and `config.use_fluid_moe` is set, with the torch class it picked (Adam or AdamW)
and its keyword arguments, and builds the optimizer from the class and kwargs returned.
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
steps; tests/cpu/test_torch_adam.py states the measured bound and why).

Resuming, second: Megatron's DistributedOptimizer.load_state_dict (without TE or apex) gives every
parameter one shared `step` tensor, which torch's foreach update would advance once per parameter;
the subclass's load_state_dict gives each parameter its own copy.

Resuming: torch's `Optimizer.load_state_dict` restores every param-group entry from the
checkpoint, `fused` and `foreach` included, so a run resumed from a checkpoint written with the
other implementation would silently run that one. The hook therefore returns, in every mode, a
subclass of Megatron's torch class (`keep_implementation`) whose load_state_dict keeps the
optimizer's own implementation settings, so a resumed run runs the flag's implementation; what it
saves is torch's state dict (same keys and shapes: `step`, `exp_avg`, `exp_avg_sq` per parameter),
so checkpoints move both ways between it, the other mode and stock Megatron. torch keeps `step` as
an fp32 tensor on the parameter's device for fused and on the CPU for foreach, and places a loaded
`step` by the groups' `fused` (and `capturable`): with this optimizer's own, as its own
implementation needs.
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


IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


class KeepImplementation:
    """Mixed in before torch's Adam/AdamW (`keep_implementation`): load_state_dict takes the
    param groups' IMPLEMENTATION entries from this optimizer, everything else from the checkpoint.

    Why: torch's Optimizer.load_state_dict replaces every param-group entry with the saved one, so
    an optimizer built with --fluid-torch-adam fused, resumed from a checkpoint written with
    foreach (another mode, or stock Megatron), would run foreach from then on, and the other way
    round, with no message. Which kernel runs is this run's choice, not the checkpoint's.

    IMPLEMENTATION: the entries that choose how torch runs the update, not what it computes (any
    value gives the same update to fp32 rounding), each set by this run's configuration: `fused`
    and `foreach` (the kernel: --fluid-torch-adam), `capturable` (`step` kept on the parameter's
    device so the update can be captured in a CUDA graph: Megatron's --optimizer-cuda-graph) and
    `differentiable` (autograd through the update; torch's fused kernel refuses it, so it must
    come from where `fused` does). The hyperparameters (lr, betas, eps, weight_decay, amsgrad,
    maximize, decoupled_weight_decay: they change the update, amsgrad also the state) and
    Megatron's own group entries (wd_mult, lr_mult, ...) come from the checkpoint, as with
    torch's class.

    The entries are replaced in the state dict torch then reads, so torch places each `step` for
    this optimizer's implementation (fp32 on the parameter's device for fused or capturable, as
    saved otherwise), as for a checkpoint written with the same implementation. Nothing else is
    overridden: isinstance with torch's class holds and state_dict() is torch's.
    """

    def load_state_dict(self, state_dict):
        import torch

        own, saved = self.param_groups, state_dict["param_groups"]
        if len(own) == len(saved):  # else torch refuses the state dict
            saved = [
                {**s, **{k: g[k] for k in IMPLEMENTATION if k in g}}
                for s, g in zip(saved, own, strict=True)
            ]
        # Each parameter's `step` its own tensor: without TE or apex, Megatron's
        # DistributedOptimizer.load_state_dict gives every parameter one shared `step` tensor,
        # which torch keeps where it needs no cast (foreach, or fused on the CPU), and the
        # foreach update's `_foreach_add_(steps, 1)` then adds 1 to it once per parameter: a
        # 3-parameter optimizer resumed at step 5 stands at 8 after one update, and Adam's bias
        # corrections are off from then on.
        state = {
            k: {**v, "step": v["step"].clone()}
            if isinstance(v, dict) and torch.is_tensor(v.get("step"))
            else v
            for k, v in state_dict.get("state", {}).items()
        }
        super().load_state_dict({**state_dict, "param_groups": saved, "state": state})


_CLASSES: dict[type, type] = {}


def keep_implementation(adam_cls: type) -> type:
    """`adam_cls` (torch's Adam or AdamW, or a subclass) with KeepImplementation mixed in:
    FluidAdam / FluidAdamW. One class per `adam_cls`."""
    if issubclass(adam_cls, KeepImplementation):
        return adam_cls
    if adam_cls not in _CLASSES:
        name = f"Fluid{adam_cls.__name__}"
        _CLASSES[adam_cls] = type(
            name, (KeepImplementation, adam_cls), {"__module__": __name__, "__qualname__": name}
        )
    return _CLASSES[adam_cls]


def torch_adam(config, adam_cls, kwargs: dict) -> tuple[type, dict]:
    """The hook: torch's Adam/AdamW class and keyword arguments for --fluid-torch-adam; see the
    module docstring. `config`: the model's TransformerConfig; `adam_cls`: torch.optim.Adam or
    AdamW. Returns (keep_implementation(adam_cls), kwargs), or both unchanged for another class."""
    import torch

    mode = FluidConfig.from_config(config).torch_adam
    if not (isinstance(adam_cls, type) and issubclass(adam_cls, torch.optim.Adam)):
        if mode == "fused":
            raise FluidConfigError(
                f"{flag('torch_adam')} fused: Megatron builds {adam_cls!r}, not torch's "
                f"Adam/AdamW: use {flag('torch_adam')} auto"
            )
        return adam_cls, kwargs
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
    return keep_implementation(adam_cls), kwargs
