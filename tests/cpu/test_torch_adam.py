"""Tier: cpu. `--fluid-torch-adam {auto,fused,foreach}`: patch 0006's hook group in Megatron's
optimizer builder and FluidMoE's hook (fluid.megatron.optimizer), on CPU (torch's fused Adam has
a CPU kernel since torch 2.4), either tree mode.

What must hold:
  - through Megatron's own builder (`get_megatron_optimizer` over a model chunk with a dense and an
    expert-parallel parameter, in a one-rank gloo world; Megatron falls back to torch's optimizers
    here, neither TE nor apex is installed): with --use-fluid-moe and `fused` both torch AdamWs it
    builds (dense and expert) have fused=True and FluidMoE's hook ran once for each; `foreach`,
    `auto` over CPU parameters and the flag off leave Megatron's stock kwargs (fused unset, the
    foreach implementation); with the flag off the hook is not called at all;
  - numerics: torch's fused and foreach AdamW, from the same fp32 parameters and gradients, agree
    after 5 steps within RTOL/ATOL (below); the moments are states of the same recurrences;
  - state dicts: a fused optimizer's state dict loads into a foreach one and the other way round,
    and continuing gives the uninterrupted run within the same bound, with `step` where each
    implementation keeps it; torch's load_state_dict also restores the checkpoint's `fused`;
  - refusals: a bad value, and `fused` where torch's fused kernel cannot run, fail with a
    FluidConfigError naming --fluid-torch-adam.

Bound: both implementations evaluate the same AdamW formula in fp32; the fused kernel orders and
fuses the operations differently (e.g. the decay p * (1 - lr * wd) and the step p - lr * m / d
in one expression), so each step may round differently by a few ulps of the operands. Measured
over 40 seeds x 3 (lr, weight decay) settings, 5 steps, parameters ~N(0, 1) and gradients
spanning 1e-4..10: exp_avg bitwise equal, exp_avg_sq within 2 ulps (relative < 2e-7), parameters
within |d| <= 1e-6 * |p| + 4.2e-9 (the absolute part where a parameter cancels towards zero and
its last bits come from the O(1) operands). RTOL 1e-6 (about 8 fp32 ulps) and ATOL 1e-7 leave a
margin of 24x on the absolute part; a real difference in the update (a dropped weight decay is
lr * wd * |p| = 1e-4 * |p| per step, a wrong bias correction is larger) is orders above it.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch

from fluid.config import FluidConfigError

RTOL, ATOL = 1e-6, 1e-7
HOOK_GROUP = "megatron.core.torch_adam_kwargs_hooks"


# --- through Megatron's builder --------------------------------------------------------------


def _transformer_config(**fields):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        use_cpu_initialization=True,
        **fields,
    )


@pytest.fixture
def hook_calls(monkeypatch):
    """FluidMoE's installed hook, spied on: the entry point loads the module attribute."""
    import fluid.megatron.optimizer as hook

    calls = []
    real = hook.torch_adam_kwargs

    def spy(config, adam_cls, kwargs):
        calls.append((config, adam_cls))
        return real(config, adam_cls, kwargs)

    monkeypatch.setattr(hook, "torch_adam_kwargs", spy)
    return calls


def _build(monkeypatch, **fields):
    """Megatron's get_megatron_optimizer over one model chunk (a dense Linear and an
    expert-parallel weight, so two torch optimizers are built, one per call site) in a one-rank
    world; returns the torch optimizers. Megatron's FP32Optimizer wrapper allocates a CUDA
    loss-scale tensor, so a CPU stand-in wraps the optimizer instead (the builder code before
    the wrapper, where the hook is called, is Megatron's own)."""
    import megatron.core.optimizer as mopt
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer
    from megatron.core.transformer.module import MegatronModule

    from fluid.testing.world import single_rank_megatron

    if not mopt.USING_PYTORCH_OPTIMIZER:
        pytest.skip("Transformer Engine or apex is installed: Megatron uses their FusedAdam")

    class CPUFP32Optimizer(FP32Optimizer):
        def __init__(self, optimizer, config, init_state_fn):
            MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
            self._scale = torch.tensor([1.0])
            self.is_stub_optimizer = optimizer is None

    monkeypatch.setattr(mopt, "FP32Optimizer", CPUFP32Optimizer)

    class Chunk(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.dense = torch.nn.Linear(8, 8)
            self.expert = torch.nn.Linear(8, 8, bias=False)
            self.expert.weight.allreduce = False  # expert-parallel: the second call site
            self.ddp_config = DistributedDataParallelConfig()

    chunk = Chunk(_transformer_config(**fields))
    with single_rank_megatron():
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1), [chunk]
        )
    inner = [o.optimizer for o in opt.chained_optimizers]
    assert len(inner) == 2 and all(type(o) is torch.optim.AdamW for o in inner)
    return inner


def test_builder_fused_gives_torch_fused_adamw(monkeypatch, hook_calls):
    opts = _build(monkeypatch, use_fluid_moe=True, fluid_torch_adam="fused")
    for o in opts:
        assert o.defaults["fused"] is True and not o.defaults["foreach"]
        assert all(g["fused"] is True for g in o.param_groups)
    assert [cls for _, cls in hook_calls] == [torch.optim.AdamW, torch.optim.AdamW]
    assert all(cfg.fluid_torch_adam == "fused" for cfg, _ in hook_calls)
    # and it steps (torch's fused CPU kernel), keeping `step` as fused does: fp32 on the device
    for o in opts:
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        o.step()
        steps = [o.state[p]["step"] for g in o.param_groups for p in g["params"]]
        assert all(s.dtype == torch.float32 and s.item() == 1.0 for s in steps)


@pytest.mark.parametrize(
    "fields,hook_runs",
    [
        ({"use_fluid_moe": True, "fluid_torch_adam": "foreach"}, True),
        ({"use_fluid_moe": True, "fluid_torch_adam": "auto"}, True),  # CPU parameters: foreach
        ({"use_fluid_moe": True}, True),  # the default is auto
        ({"fluid_torch_adam": "fused"}, False),  # flag off: Megatron's builder, no hook
    ],
)
def test_builder_keeps_megatrons_stock_adamw_otherwise(monkeypatch, hook_calls, fields, hook_runs):
    opts = _build(monkeypatch, **fields)
    for o in opts:
        assert not o.defaults["fused"] and not o.defaults["foreach"]  # torch's default: foreach
        assert all(not g["fused"] for g in o.param_groups)
    assert len(hook_calls) == (2 if hook_runs else 0)


def test_builder_refuses_a_bad_value_naming_the_flag(monkeypatch):
    with pytest.raises(FluidConfigError, match=re.escape("--fluid-torch-adam")):
        _build(monkeypatch, use_fluid_moe=True, fluid_torch_adam="on")


def test_hook_group_and_model_config_helper():
    """The seam: the group name, the installed hook, and the config lookup for every shape of
    `model_chunks` (the builder's call sites pass lists; one module is its own chunk)."""
    from importlib.metadata import entry_points

    from megatron.core.optimizer import TORCH_ADAM_KWARGS_HOOK_GROUP, _model_config

    assert TORCH_ADAM_KWARGS_HOOK_GROUP == HOOK_GROUP
    assert {ep.value for ep in entry_points(group=HOOK_GROUP)} >= {
        "fluid.megatron.optimizer:torch_adam_kwargs"
    }
    cfg = SimpleNamespace(use_fluid_moe=True)
    chunk = SimpleNamespace(config=cfg)
    assert _model_config([chunk, SimpleNamespace()]) is cfg
    assert _model_config((chunk,)) is cfg
    assert _model_config(chunk) is cfg
    assert _model_config([]) is None
    assert _model_config([SimpleNamespace()]) is None
    assert _model_config(None) is None


# --- the hook --------------------------------------------------------------------------------


def _kwargs(*params, **extra):
    return {"params": [{"params": list(params), "wd_mult": 1.0}], "lr": 1e-3, **extra}


def _hook(mode, kwargs, adam_cls=torch.optim.AdamW):
    from fluid.megatron.optimizer import torch_adam_kwargs

    return torch_adam_kwargs(SimpleNamespace(fluid_torch_adam=mode), adam_cls, kwargs)


def test_hook_modes():
    p = torch.nn.Parameter(torch.zeros(3))
    assert _hook("fused", _kwargs(p))["fused"] is True
    for mode in ("foreach", "auto"):  # auto: a CPU parameter
        assert "fused" not in _hook(mode, _kwargs(p))
    assert _hook("fused", _kwargs(p), torch.optim.Adam)["fused"] is True
    # params as a plain tensor list, or a one-shot iterator (kept usable for the optimizer)
    assert _hook("fused", {"params": [p]})["fused"] is True
    out = _hook("fused", {"params": iter([p])})
    torch.optim.AdamW(**out).step()


def test_auto_resolves_by_device():
    """auto is fused iff every parameter is on a CUDA device (checked by device only, so no GPU
    is needed: torch.device('cuda') exists without one)."""
    from fluid.megatron.optimizer import resolve

    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), torch.zeros(1)
    assert resolve("auto", [cuda, cuda]) == "fused"
    assert resolve("auto", [cuda, cpu]) == "foreach"
    assert resolve("auto", [cpu]) == "foreach"
    assert resolve("auto", []) == "foreach"
    assert resolve("fused", [cpu]) == "fused" and resolve("foreach", [cuda]) == "foreach"


@pytest.mark.parametrize(
    "kwargs,adam_cls,why",
    [
        (_kwargs(torch.zeros(3, dtype=torch.int64)), torch.optim.AdamW, "torch.int64"),
        (_kwargs(torch.zeros(3, dtype=torch.complex64)), torch.optim.AdamW, "complex64"),
        (_kwargs(torch.empty(3, device="meta")), torch.optim.AdamW, "on meta"),
        (_kwargs(torch.zeros(3), foreach=True), torch.optim.AdamW, "foreach=True"),
        (_kwargs(torch.zeros(3), differentiable=True), torch.optim.AdamW, "differentiable=True"),
        (_kwargs(torch.zeros(3)), torch.optim.SGD, "not torch's Adam/AdamW"),
    ],
)
def test_fused_refused_where_it_cannot_run(kwargs, adam_cls, why):
    with pytest.raises(FluidConfigError, match="--fluid-torch-adam fused") as e:
        _hook("fused", kwargs, adam_cls)
    assert why in str(e.value)


def test_bad_mode_refused_naming_the_flag():
    for bad in ("on", True, "Fused"):
        with pytest.raises(FluidConfigError, match=re.escape("--fluid-torch-adam")):
            _hook(bad, _kwargs(torch.zeros(1)))


def test_non_adam_class_untouched_unless_fused_is_asked():
    kw = _kwargs(torch.zeros(1))
    assert _hook("auto", dict(kw), torch.optim.SGD) == kw


# --- numerics and state dicts ----------------------------------------------------------------

SHAPES = [(257, 129), (1000,), (64, 64, 3), (1,)]


def _problem(seed, steps):
    """fp32 parameters ~N(0, 1) and per-step gradients spanning 1e-4..10 (fixed, independent of
    the parameters, so both implementations see the same gradients)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [
        [
            torch.randn(s, generator=g) * 10.0 ** torch.randint(-4, 2, (1,), generator=g).item()
            for s in SHAPES
        ]
        for _ in range(steps)
    ]
    return params, grads


def _adamw(params, impl, lr=1e-3, weight_decay=0.1):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=weight_decay,
        **({"fused": True} if impl == "fused" else {"foreach": True}),
    )
    return ps, opt


def _steps(ps, opt, grads):
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _impl(opt):
    (fused,) = {bool(g["fused"]) for g in opt.param_groups}
    (foreach,) = {bool(g["foreach"]) for g in opt.param_groups}
    assert fused != foreach
    return "fused" if fused else "foreach"


def _assert_same(ps_a, opt_a, ps_b, opt_b):
    for pa, pb in zip(ps_a, ps_b, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=RTOL, atol=ATOL)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=ATOL)
        assert sa["step"].item() == sb["step"].item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("lr,weight_decay", [(1e-3, 0.1), (1e-2, 0.0)])
def test_fused_matches_foreach_within_the_bound(seed, lr, weight_decay):
    params, grads = _problem(seed, 5)
    ps_f, opt_f = _adamw(params, "fused", lr, weight_decay)
    ps_e, opt_e = _adamw(params, "foreach", lr, weight_decay)
    _steps(ps_f, opt_f, grads)
    _steps(ps_e, opt_e, grads)
    assert (_impl(opt_f), _impl(opt_e)) == ("fused", "foreach")
    _assert_same(ps_f, opt_f, ps_e, opt_e)
    # not vacuous: the parameters moved by far more than the bound, and the implementations do
    # differ in rounding (else this would not tell fused from foreach)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(ps_f, params, strict=True))
    assert moved > 1e3 * ATOL
    assert any(not torch.equal(a, b) for a, b in zip(ps_f, ps_e, strict=True))


def _keep_implementation(opt, state_dict):
    """`state_dict` with the saved param groups' implementation replaced by `opt`'s own."""
    sd = copy.copy(state_dict)
    sd["param_groups"] = [
        {**saved, "fused": cur["fused"], "foreach": cur["foreach"]}
        for saved, cur in zip(state_dict["param_groups"], opt.param_groups, strict=True)
    ]
    return sd


@pytest.mark.parametrize("src,dst", [("fused", "foreach"), ("foreach", "fused")])
@pytest.mark.parametrize("keep_dst", [False, True])
def test_state_dict_moves_both_ways(src, dst, keep_dst):
    """Save after 3 steps with `src`, load into a fresh `dst` optimizer, 2 more steps: the result
    is the uninterrupted 5-step run's (either implementation) within the bound. torch's
    load_state_dict restores every saved param-group entry, `fused` and `foreach` included, so
    the loaded optimizer runs `src` from then on; with the groups kept at `dst`'s own values (what
    a resume with another --fluid-torch-adam would need) it continues as `dst`, and `step` is kept
    where `dst` keeps it."""
    params, grads = _problem(7, 5)
    ps_ref, opt_ref = _adamw(params, dst)
    _steps(ps_ref, opt_ref, grads)

    ps_a, opt_a = _adamw(params, src)
    _steps(ps_a, opt_a, grads[:3])
    saved = copy.deepcopy(opt_a.state_dict())
    ps_b, opt_b = _adamw([p.detach() for p in ps_a], dst)
    opt_b.load_state_dict(_keep_implementation(opt_b, saved) if keep_dst else saved)
    assert _impl(opt_b) == (dst if keep_dst else src)
    for p in ps_b:
        st = opt_b.state[p]
        assert st["step"].item() == 3.0 and st["step"].dtype == torch.float32
        assert st["step"].device == p.device  # CPU: fused keeps it on the param's, foreach on CPU
        assert st["step"] is not opt_a.state[ps_a[0]]["step"]
    _steps(ps_b, opt_b, grads[3:])
    _assert_same(ps_b, opt_b, ps_ref, opt_ref)
