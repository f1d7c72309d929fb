"""Tier: cpu. `print_fluid_layer_info(model)` ends with the state of the model's BackwardScheduler
(as v0.5's did): on/off, whether dW is deferred, timing, pending tasks. The scheduler is the one a
module of the model holds, else the process's."""

import contextlib
import io

import torch

from fluid.megatron.info import model_scheduler, print_fluid_layer_info
from fluid.schedule import BackwardScheduler, get_backward_scheduler


def _last_line(model) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_fluid_layer_info(model, rank0_only=False)
    return buf.getvalue().splitlines()[-1].strip()


def test_info_ends_with_the_process_scheduler_state():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    sched = get_backward_scheduler()
    was = sched.enabled
    try:
        sched.enable()
        assert model_scheduler(model) is sched
        line = _last_line(model)
        assert line.startswith("scheduler: enabled"), line
        assert "timing off" in line and "0 dW task(s) pending" in line, line
        sched.disable()
        assert _last_line(model).startswith("scheduler: disabled (every dW inline"), line
    finally:
        sched.enable() if was else sched.disable()


def test_info_reports_the_scheduler_a_module_holds():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    own = BackwardScheduler(enabled=False, timing=True)
    model[0].backward_scheduler = own
    assert model_scheduler(model) is own
    line = _last_line(model)
    assert line.startswith("scheduler: disabled") and "timing on" in line, line
