"""Tier: cpu. `accumulate_weight_grad`: how a deferred dW reaches `param.grad` and the hooks.

What must hold (see `fluid/schedule/wgrad.py`):
  - a temporary dW is adopted as `param.grad` (same storage), not copied: a copy is a second
    dW-sized buffer and a copy kernel per backward under Megatron DDP, which clears `param.grad`
    after every hook (the Mixtral-like layer's expert dW is 0.44 GiB);
  - later dWs add into `param.grad` in place, as AccumulateGrad does in a stock backward;
  - hooks on the parameter's AccumulateGrad node (Megatron DDP registers there) and
    post-accumulate-grad hooks fire once per call, with the gradient present;
  - a dW in another dtype is converted to the parameter's dtype.
Values are exact (torch.equal): adoption and one in-place add do no arithmetic beyond the add.
"""

import torch

from fluid.schedule import accumulate_weight_grad


def _make(shape, ptrs, dtype=torch.float32, seed=0):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    ptrs.append(g.data_ptr())
    return g


def test_temporary_dw_is_adopted_not_copied_then_accumulated_in_place():
    p = torch.nn.Parameter(torch.zeros(64, 32))
    ptrs = []
    accumulate_weight_grad(p, _make((64, 32), ptrs, seed=1))
    assert p.grad.data_ptr() == ptrs[0], "dW was copied into param.grad instead of adopted"
    first = p.grad.clone()
    accumulate_weight_grad(p, _make((64, 32), ptrs, seed=2))
    assert p.grad.data_ptr() == ptrs[0], "second dW replaced param.grad instead of adding into it"
    assert torch.equal(p.grad, first + _make((64, 32), [], seed=2))


def test_held_dw_is_copied_so_the_caller_keeps_its_tensor():
    p = torch.nn.Parameter(torch.zeros(8, 4))
    g = torch.ones(8, 4)
    accumulate_weight_grad(p, g)
    assert p.grad.data_ptr() != g.data_ptr()
    g.add_(1)  # the caller's tensor is its own: param.grad must not change with it
    assert torch.equal(p.grad, torch.ones(8, 4))


def test_ddp_style_node_hook_and_post_accumulate_hook_fire_once_per_call():
    p = torch.nn.Parameter(torch.zeros(16, 8))
    grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]  # as Megatron DDP registers
    node_calls, post_calls = [], []

    def ddp_hook(*_):  # Megatron DDP: main_grad += grad; grad = None
        assert p.grad is not None
        node_calls.append(p.grad.clone())
        p.main_grad.add_(p.grad)
        p.grad = None

    p.main_grad = torch.zeros(16, 8)
    grad_acc.register_hook(ddp_hook)
    p.register_post_accumulate_grad_hook(lambda q: post_calls.append(1))
    for seed in (3, 4):
        accumulate_weight_grad(p, _make((16, 8), [], seed=seed))
    assert len(node_calls) == 2 and len(post_calls) == 2
    expect = _make((16, 8), [], seed=3) + _make((16, 8), [], seed=4)
    assert torch.equal(p.main_grad, expect)


def test_dw_in_other_dtype_is_converted():
    p = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))
    accumulate_weight_grad(p, _make((8, 8), [], dtype=torch.float32, seed=5))
    assert p.grad.dtype == torch.bfloat16
    assert torch.equal(p.grad, _make((8, 8), [], seed=5).to(torch.bfloat16))


def test_frozen_parameter_is_left_alone():
    p = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    accumulate_weight_grad(p, torch.ones(4))
    assert p.grad is None
