"""Tier: cpu. `--fluid-torch-adam {auto,fused,foreach}`: patch 0006's hook group in Megatron's
optimizer builder and FluidMoE's hook (fluid.megatron.optimizer), on CPU (torch's fused Adam has
a CPU kernel since torch 2.4), either tree mode.

What must hold:
  - through Megatron's own builder (`get_megatron_optimizer` over a model chunk with a dense and an
    expert-parallel parameter, in a one-rank gloo world; Megatron falls back to torch's optimizers
    here, neither TE nor apex is installed): with --use-fluid-moe both optimizers it builds (dense
    and expert) are FluidMoE's subclass of the torch class Megatron picked (AdamW, or Adam without
    decoupled weight decay; isinstance of it) and FluidMoE's hook ran once for each; `fused` gives
    fused=True, `foreach`, `auto` over CPU parameters leave Megatron's stock kwargs (fused unset,
    the foreach implementation); with the flag off the hook is not called at all and the
    optimizers are torch's own class;
  - numerics: torch's fused and foreach AdamW, from the same fp32 parameters and gradients, agree
    after 5 steps within RTOL/ATOL (below); the moments are states of the same recurrences;
  - state dicts: FluidMoE's subclass saves torch's state dict (same keys, shapes, values), which
    loads into torch's class and back; a state dict saved with one implementation (by torch's
    class or FluidMoE's, or through Megatron's optimizer wrappers) loads into a FluidMoE optimizer
    of the other, which keeps its own implementation (--fluid-torch-adam wins on resume; torch's
    own load_state_dict would switch to the checkpoint's) and continues as the uninterrupted run
    within the same bound, with `step` placed for its own implementation; the hyperparameters and
    Megatron's group entries still come from the checkpoint;
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
from fluid.testing.moe import tiny_config

RTOL, ATOL = 1e-6, 1e-7
HOOK_GROUP = "megatron.core.torch_adam_hooks"


# --- through Megatron's builder --------------------------------------------------------------


@pytest.fixture
def hook_calls(monkeypatch):
    """FluidMoE's installed hook, spied on: the entry point loads the module attribute."""
    import fluid.megatron.optimizer as hook

    calls = []
    real = hook.torch_adam

    def spy(config, adam_cls, kwargs):
        calls.append((config, adam_cls))
        return real(config, adam_cls, kwargs)

    monkeypatch.setattr(hook, "torch_adam", spy)
    return calls


def _build(monkeypatch, decoupled_weight_decay=True, outer=False, **fields):
    """Megatron's get_megatron_optimizer over one model chunk (a dense Linear and an
    expert-parallel weight, so two torch optimizers are built, one per call site) in a one-rank
    world; returns the torch optimizers (and Megatron's, with `outer`). Megatron's FP32Optimizer wrapper allocates a CUDA
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

    chunk = Chunk(tiny_config(**fields))
    with single_rank_megatron():
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-3,
                weight_decay=0.1,
                decoupled_weight_decay=decoupled_weight_decay,
            ),
            [chunk],
        )
    inner = [o.optimizer for o in opt.chained_optimizers]
    assert len(inner) == 2
    return (opt, inner) if outer else inner


def _fluid_cls(torch_cls):
    from fluid.megatron.optimizer import keep_implementation

    return keep_implementation(torch_cls)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("fluid", [True, False])
def test_builder_returns_the_subclass_with_the_flag_and_torchs_class_without(
    monkeypatch, hook_calls, decoupled, fluid
):
    torch_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    fields = {"use_fluid_moe": True} if fluid else {}
    opts = _build(monkeypatch, decoupled_weight_decay=decoupled, **fields)
    want = _fluid_cls(torch_cls) if fluid else torch_cls
    for o in opts:
        assert type(o) is want and isinstance(o, torch_cls)
    assert [cls for _, cls in hook_calls] == ([torch_cls] * 2 if fluid else [])
    if fluid:
        from fluid.megatron.optimizer import KeepImplementation

        assert want.__mro__[1:] == (KeepImplementation, *torch_cls.__mro__)
        assert want.__name__ == f"Fluid{torch_cls.__name__}"
        assert _fluid_cls(want) is want  # a subclass is not wrapped twice


def test_builder_resume_keeps_the_flags_implementation(monkeypatch):
    """Through Megatron's own wrappers (ChainedOptimizer, FP32Optimizer, which reorders the saved
    groups to the optimizer's before torch loads them): the state dict of a fused build loads
    into a foreach build and the other way round; each keeps its own implementation, and the
    state (exp_avg, `step`) is the saved one."""
    built = {}
    for mode in ("fused", "foreach"):
        opt, inner = _build(monkeypatch, outer=True, use_fluid_moe=True, fluid_torch_adam=mode)
        for o in inner:
            for g in o.param_groups:
                for p in g["params"]:
                    p.grad = torch.full_like(p, 0.5 if mode == "fused" else -0.25)
            o.step()
        built[mode] = (opt, inner)
    for src, dst in (("fused", "foreach"), ("foreach", "fused")):
        saved = copy.deepcopy(built[src][0].state_dict())
        opt, inner = _build(monkeypatch, outer=True, use_fluid_moe=True, fluid_torch_adam=dst)
        opt.load_state_dict(saved)
        for o, o_src in zip(inner, built[src][1], strict=True):
            assert all(bool(g["fused"]) == (dst == "fused") for g in o.param_groups)
            ps = [p for g in o.param_groups for p in g["params"]]
            ps_src = [p for g in o_src.param_groups for p in g["params"]]
            for p, p_src in zip(ps, ps_src, strict=True):
                assert torch.equal(o.state[p]["exp_avg"], o_src.state[p_src]["exp_avg"])
                assert o.state[p]["step"].item() == 1.0


def test_builder_fused_gives_torch_fused_adamw(monkeypatch, hook_calls):
    opts = _build(monkeypatch, use_fluid_moe=True, fluid_torch_adam="fused")
    for o in opts:
        assert type(o) is _fluid_cls(torch.optim.AdamW)
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
        assert type(o) is (_fluid_cls(torch.optim.AdamW) if hook_runs else torch.optim.AdamW)
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

    from megatron.core.optimizer import TORCH_ADAM_HOOK_GROUP, _model_config

    assert TORCH_ADAM_HOOK_GROUP == HOOK_GROUP
    assert {ep.value for ep in entry_points(group=HOOK_GROUP)} >= {
        "fluid.megatron.optimizer:torch_adam"
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
    """FluidMoE's hook: (class, kwargs)."""
    from fluid.megatron.optimizer import torch_adam

    return torch_adam(SimpleNamespace(fluid_torch_adam=mode), adam_cls, kwargs)


def test_hook_modes():
    p = torch.nn.Parameter(torch.zeros(3))
    for adam_cls in (torch.optim.AdamW, torch.optim.Adam):
        cls, kw = _hook("fused", _kwargs(p), adam_cls)
        assert cls is _fluid_cls(adam_cls) and kw["fused"] is True
        for mode in ("foreach", "auto"):  # auto: a CPU parameter
            cls, kw = _hook(mode, _kwargs(p), adam_cls)
            assert cls is _fluid_cls(adam_cls) and "fused" not in kw
    # params as a plain tensor list, or a one-shot iterator (kept usable for the optimizer)
    assert _hook("fused", {"params": [p]})[1]["fused"] is True
    cls, out = _hook("fused", {"params": iter([p])})
    cls(**out).step()


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
    assert _hook("auto", dict(kw), torch.optim.SGD) == (torch.optim.SGD, kw)


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


def _adamw(params, impl, lr=1e-3, weight_decay=0.1, fluid=False):
    """Parameters (copies of `params`) and an AdamW over them with `impl`: torch's class, or with
    `fluid` the class and kwargs from FluidMoE's hook for --fluid-torch-adam `impl`. Megatron
    passes no `foreach`, and torch then picks foreach on CUDA but its single-tensor loop on CPU:
    foreach=True is explicit here so that this CPU test runs the foreach kernel."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    kwargs = {
        "params": [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
        "lr": lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": weight_decay,
    }
    if fluid:
        cls, kwargs = _hook(impl, {**kwargs, **({"foreach": True} if impl == "foreach" else {})})
        assert cls is _fluid_cls(torch.optim.AdamW)
        return ps, cls(**kwargs)
    return ps, torch.optim.AdamW(**kwargs, **{impl: True})


def _steps(ps, opt, grads):
    for step_grads in grads:
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _impl(groups):
    """The implementation `groups` (param groups, an optimizer's or a state dict's) select."""
    (fused,) = {bool(g["fused"]) for g in groups}
    (foreach,) = {bool(g["foreach"]) for g in groups}
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
    assert (_impl(opt_f.param_groups), _impl(opt_e.param_groups)) == ("fused", "foreach")
    _assert_same(ps_f, opt_f, ps_e, opt_e)
    # not vacuous: the parameters moved by far more than the bound, and the implementations do
    # differ in rounding (else this would not tell fused from foreach)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(ps_f, params, strict=True))
    assert moved > 1e3 * ATOL
    assert any(not torch.equal(a, b) for a, b in zip(ps_f, ps_e, strict=True))


@pytest.mark.parametrize("src,dst", [("fused", "foreach"), ("foreach", "fused")])
@pytest.mark.parametrize("writer", ["torch", "fluid"])
def test_state_dict_moves_both_ways(src, dst, writer):
    """Save after 3 steps with `src` (torch's class, as stock Megatron or a run before this
    subclass wrote it, or FluidMoE's), load into a fresh FluidMoE optimizer built for `dst`, 2
    more steps: the flag wins on resume. The loaded optimizer runs `dst`, although the checkpoint
    says `src` (torch's load_state_dict would take `src` from it), with `step` placed where `dst`
    keeps it, and the result is the uninterrupted 5-step `dst` run's within the bound."""
    params, grads = _problem(7, 5)
    ps_ref, opt_ref = _adamw(params, dst)
    _steps(ps_ref, opt_ref, grads)

    ps_a, opt_a = _adamw(params, src, fluid=writer == "fluid")
    _steps(ps_a, opt_a, grads[:3])
    saved = copy.deepcopy(opt_a.state_dict())
    assert _impl(saved["param_groups"]) == src
    ps_b, opt_b = _adamw([p.detach() for p in ps_a], dst, fluid=True)
    opt_b.load_state_dict(saved)
    assert _impl(opt_b.param_groups) == dst and _impl(saved["param_groups"]) == src
    for p in ps_b:
        st = opt_b.state[p]
        assert st["step"].item() == 3.0 and st["step"].dtype == torch.float32
        assert st["step"].device == p.device  # CPU: fused keeps it on the param's, foreach on CPU
        assert st["step"] is not opt_a.state[ps_a[0]]["step"]
    _steps(ps_b, opt_b, grads[3:])
    _assert_same(ps_b, opt_b, ps_ref, opt_ref)


def test_state_dict_is_torchs():
    """FluidMoE's subclass saves exactly torch's state dict (keys, group entries, state tensors),
    so stock Megatron loads its checkpoints and it loads theirs; loaded either way, both continue
    bitwise alike (the same implementation)."""
    params, grads = _problem(3, 4)
    ps_t, opt_t = _adamw(params, "fused")
    ps_f, opt_f = _adamw(params, "fused", fluid=True)
    assert isinstance(opt_f, torch.optim.AdamW) and type(opt_f) is not torch.optim.AdamW
    _steps(ps_t, opt_t, grads[:2])
    _steps(ps_f, opt_f, grads[:2])
    sd_t, sd_f = opt_t.state_dict(), opt_f.state_dict()
    assert sd_t.keys() == sd_f.keys() and sd_t["param_groups"] == sd_f["param_groups"]
    assert sd_t["state"].keys() == sd_f["state"].keys()
    for k, st in sd_t["state"].items():
        assert st.keys() == sd_f["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, t in st.items():
            u = sd_f["state"][k][key]
            assert (t.shape, t.dtype, t.device) == (u.shape, u.dtype, u.device)
            assert torch.equal(t, u)
    # across: torch's class loads FluidMoE's state dict and FluidMoE's torch's
    ps_t2, opt_t2 = _adamw([p.detach() for p in ps_f], "fused")
    ps_f2, opt_f2 = _adamw([p.detach() for p in ps_t], "fused", fluid=True)
    opt_t2.load_state_dict(copy.deepcopy(sd_f))
    opt_f2.load_state_dict(copy.deepcopy(sd_t))
    for ps, opt in ((ps_t, opt_t), (ps_f, opt_f), (ps_t2, opt_t2), (ps_f2, opt_f2)):
        _steps(ps, opt, grads[2:])
    for ps, opt in ((ps_f, opt_f), (ps_t2, opt_t2), (ps_f2, opt_f2)):
        assert all(torch.equal(a, b) for a, b in zip(ps, ps_t, strict=True))
        assert opt.state_dict()["param_groups"] == opt_t.state_dict()["param_groups"]


def test_load_keeps_only_the_implementation():
    """What load_state_dict keeps (fused, foreach, capturable, differentiable: this optimizer's)
    and what it takes from the checkpoint (every other entry: torch's hyperparameters and
    Megatron's own group entries), and `step` placed for this optimizer's implementation: a
    float64 `step` (another writer's) becomes fused's fp32, a fused fp32 `step` stays as saved
    in a foreach optimizer."""
    from fluid.megatron.optimizer import IMPLEMENTATION

    assert set(IMPLEMENTATION) == {"fused", "foreach", "capturable", "differentiable"}
    params, grads = _problem(5, 2)
    _, src = _adamw(params, "foreach")
    saved = src.state_dict()
    changed = {
        "lr": 0.5,
        "betas": (0.5, 0.6),
        "eps": 1e-3,
        "weight_decay": 0.25,
        "maximize": True,
        "wd_mult": 0.5,
        "capturable": True,
        "differentiable": True,
    }
    saved["param_groups"] = [{**g, **changed} for g in saved["param_groups"]]
    saved["state"] = {
        k: {
            "step": torch.tensor(2.0, dtype=torch.float64),
            "exp_avg": p.new_ones(p.shape),
            "exp_avg_sq": p.new_ones(p.shape),
        }
        for k, p in enumerate(params)
    }
    for impl in ("fused", "foreach"):
        ps, opt = _adamw(params, impl, fluid=True)
        own = [dict(g) for g in opt.param_groups]
        opt.load_state_dict(copy.deepcopy(saved))
        for g, o, sv in zip(opt.param_groups, own, saved["param_groups"], strict=True):
            assert {k: g[k] for k in IMPLEMENTATION} == {k: o[k] for k in IMPLEMENTATION}
            assert {k: v for k, v in g.items() if k not in IMPLEMENTATION and k != "params"} == {
                k: v for k, v in sv.items() if k not in IMPLEMENTATION and k != "params"
            }
            assert g["lr"] == 0.5 and g["wd_mult"] == 0.5 and g["betas"] == (0.5, 0.6)
        want = torch.float32 if impl == "fused" else torch.float64
        assert all(opt.state[p]["step"].dtype == want for p in ps)
        _steps(ps, opt, grads)  # runs: a checkpoint's differentiable=True would refuse fused
        assert all(opt.state[p]["step"].item() == 4.0 for p in ps)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_load_gives_each_parameter_its_own_step(impl):
    """Megatron's DistributedOptimizer.load_state_dict (no TE, no apex) puts one `step` tensor
    into every parameter's state. Loaded into torch's own AdamW with the foreach kernel, that
    tensor stays shared and one update adds 1 to it once per parameter (5 -> 5 + n); FluidMoE's
    class gives each parameter its own copy: 5 -> 6 for every parameter, whatever the
    implementation."""
    params, grads = _problem(7, 2)
    _, src = _adamw(params, "foreach")
    sd = src.state_dict()
    shared = torch.tensor(5.0)
    sd["state"] = {
        k: {"step": shared, "exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}
        for k, p in enumerate(params)
    }
    ps, opt = _adamw(params, impl, fluid=True)
    opt.load_state_dict(copy.deepcopy(sd))  # deepcopy keeps the aliasing, as Megatron's dict
    _steps(ps, opt, grads[:1])
    assert [float(opt.state[p]["step"]) for p in ps] == [6.0] * len(ps)
    ps_t, opt_t = _adamw(params, "foreach")  # torch's class: the bug this guards against
    opt_t.load_state_dict(copy.deepcopy(sd))
    _steps(ps_t, opt_t, grads[:1])
    assert float(opt_t.state[ps_t[0]]["step"]) == 5.0 + len(ps_t)
