"""Tier: cpu. `--fluid-overlap measure` (fluid.schedule.overlap_trial): the order of the trial,
the decision from the times, and, through a real MoE layer, that every micro-batch keeps one
setting from forward to backward and that the gradients equal those of overlap never / always
bitwise (deferring moves a dW in time, not its value: the same GEMMs, accumulated into main_grad
in the same order). The clock is a stand-in the test advances, so the decision is the test's."""

import pytest
import torch

from fluid.schedule.overlap_trial import OverlapTrial
from fluid.testing.world import single_rank_megatron


class FakeClock:
    """Marks are (index, time); `blocked` marks are not ready (an event still on the GPU)."""

    def __init__(self):
        self.t, self.n, self.blocked = 0.0, 0, set()

    def mark(self):
        self.n += 1
        return (self.n, self.t)

    def ready(self, mark):
        return mark[0] not in self.blocked

    def ms(self, start, end):
        return end[1] - start[1]


def _drive(trial, clock, n, on_ms, off_ms, skip_backward=()):
    """n micro-batches; each takes on_ms with overlap on, off_ms otherwise (auto counts as off)."""
    choices = []
    for i in range(n):
        trial.start_microbatch()
        c = trial.choice()
        choices.append(c)
        clock.t += on_ms if c else off_ms
        if i not in skip_backward:
            trial.end_backward()
    return choices


@pytest.mark.parametrize("on_ms,off_ms,want", [(10.0, 12.0, True), (12.0, 10.0, False)])
def test_trial_order_and_decision(on_ms, off_ms, want):
    clock = FakeClock()
    trial = OverlapTrial(warmup=2, samples=2, clock=clock)
    choices = _drive(trial, clock, 8, on_ms, off_ms)
    # warm-up follows the link (None), then ABBA, then the decision from the next start on
    assert choices == [None, None, True, False, False, True, want, want]
    assert trial.decision is want and not trial.measuring
    s = trial.stats()
    assert s["on_ms"] == [on_ms, on_ms] and s["off_ms"] == [off_ms, off_ms]


def test_trial_waits_for_unread_times_and_redoes_a_microbatch_without_backward():
    clock = FakeClock()
    trial = OverlapTrial(warmup=0, samples=2, clock=clock)
    # micro-batch 1 (the first "off") has no backward: not counted
    choices = _drive(trial, clock, 4, 10.0, 12.0, skip_backward={1})
    assert choices == [True, False, False, True]
    clock.blocked.add(clock.n)  # the last end mark (an "on" one) still on the GPU
    choices = _drive(trial, clock, 2, 10.0, 12.0)
    # the trial goes on in ABBA order while one "off" is short (a sample is taken when the next
    # micro-batch starts) and micro-batch 3's time is unread
    assert choices == [True, False] and trial.decision is None
    assert trial.stats()["off_ms"] == [12.0] and trial.stats()["on_ms"] == [10.0, 10.0]
    clock.blocked.clear()
    trial.start_microbatch()
    assert trial.decision is True and trial.choice() is True
    assert trial.stats()["off_ms"] == [12.0, 12.0] and len(trial.stats()["on_ms"]) == 3
    with pytest.raises(ValueError):
        OverlapTrial(warmup=-1)


def test_trial_gives_up_when_times_never_become_readable(caplog):
    from fluid.schedule.overlap_trial import MAX_TRIAL_FACTOR

    class NeverReady(FakeClock):
        def ready(self, mark):
            return False

    clock = NeverReady()
    trial = OverlapTrial(warmup=1, samples=2, clock=clock)
    choices = _drive(trial, clock, 1 + MAX_TRIAL_FACTOR * 2 + 2, 10.0, 12.0)
    assert choices[0] is None and None not in choices[1 : 1 + MAX_TRIAL_FACTOR * 2]
    assert choices[-2:] == [None, None]  # the link's policy from then on
    assert trial.decision is None and not trial.measuring
    assert "no decision" in caplog.text


@pytest.fixture(scope="module")
def _world():
    with single_rank_megatron():
        yield


def _train(overlap, n=8, on_ms=10.0, off_ms=12.0):
    """n micro-batches through the tiny 64-expert layer with grad accumulation; returns the
    main_grads, the scheduler's stats and per micro-batch (choice, deferred dW, inline dW)."""
    from fluid.testing.moe import fine_grained_test_layer, reset_ddp_flags

    layer, accs = fine_grained_test_layer(64, fluid_overlap=overlap)  # noqa: F841 (DDP hooks)
    sched = layer.scheduler
    clock = FakeClock()
    if overlap == "measure":
        assert sched.trial is not None
        sched.trial.warmup, sched.trial.samples, sched.trial._clock = 2, 2, clock
    else:
        assert sched.trial is None
    reset_ddp_flags(layer.parameters())
    g = torch.Generator().manual_seed(5)
    per_mb = []
    for _ in range(n):
        x = torch.randn(48, 1, 64, generator=g).requires_grad_(True)
        dy = torch.randn(48, 1, 64, generator=g)
        before = dict(sched.get_stats())
        out, _ = layer(x)
        choice = sched.trial.choice() if sched.trial is not None else None
        clock.t += on_ms if choice else off_ms
        out.backward(dy)
        after = sched.get_stats()
        deferred = after["flushed_dw_tasks"] - before["flushed_dw_tasks"]
        inline = after["inline_dw_tasks"] - before["inline_dw_tasks"]
        per_mb.append((choice, deferred, inline))
    grads = {k: p.main_grad.clone() for k, p in layer.named_parameters()}
    return grads, sched.get_stats(), per_mb


@pytest.mark.parametrize("on_ms,off_ms,want", [(10.0, 12.0, True), (12.0, 10.0, False)])
def test_measure_through_a_layer_same_gradients(_world, on_ms, off_ms, want):
    grads, stats, per_mb = _train("measure", 8, on_ms, off_ms)
    assert stats["overlap_trial"]["decision"] is want
    choices = [c for c, _, _ in per_mb]
    assert choices == [None, None, True, False, False, True, want, want]
    for c, deferred, inline in per_mb:
        # gloo: the link's policy (auto) overlaps, so warm-up defers too; off runs dW inline
        if c is False:
            assert deferred == 0 and inline > 0, per_mb
        else:
            assert deferred > 0 and inline == 0, per_mb
    for ref in ("never", "always"):
        ref_grads, _, _ = _train(ref, 8)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert torch.equal(grads[k], ref_grads[k]), (ref, k)


def test_measure_ignores_forwards_without_grad(_world):
    from fluid.testing.moe import fine_grained_test_layer

    layer, accs = fine_grained_test_layer(64, fluid_overlap="measure")  # noqa: F841
    trial = layer.scheduler.trial
    with torch.no_grad():
        layer(torch.randn(48, 1, 64))
        layer(torch.randn(48, 1, 64))
    assert trial._started == 0  # evaluation forwards start no micro-batch


def test_measure_refused_where_it_cannot_time(_world):
    from fluid.config import FluidConfigError
    from fluid.megatron.validate import validate_config
    from fluid.testing.moe import tiny_config

    assert validate_config(tiny_config(use_fluid_moe=True, fluid_overlap="measure")).overlap == (
        "measure"
    )
    with pytest.raises(FluidConfigError, match="--no-fluid-scheduler"):
        validate_config(
            tiny_config(use_fluid_moe=True, fluid_overlap="measure", fluid_scheduler=False)
        )
    cfg = tiny_config(use_fluid_moe=True, fluid_overlap="measure")
    cfg.overlap_moe_expert_parallel_comm = True  # set after build: its own checks need bf16, EP>1
    with pytest.raises(FluidConfigError, match="--fluid-overlap auto"):
        validate_config(cfg)
    cfg = tiny_config(use_fluid_moe=True, fluid_overlap="measure")
    cfg.pipeline_model_parallel_size = 2
    with pytest.raises(FluidConfigError, match="--pipeline-model-parallel-size 2"):
        validate_config(cfg)


def test_training_log_line_reports_the_trial():
    from fluid.megatron.log_hook import combined_stats, format_stats

    measuring = {
        "total_dw_tasks": 3,
        "overlap_trial": {"decision": None, "on_ms": [1.0], "off_ms": []},
    }
    assert "overlap measuring (1 on / 0 off timed)" in format_stats(measuring)
    done = {"overlap_trial": {"decision": False, "on_ms": [12.0, 13.0], "off_ms": [10.0, 11.0]}}
    assert "overlap measured off (12.5 / 10.5 ms per micro-batch on / off)" in format_stats(done)
    both = combined_stats([dict(done, total_dw_tasks=1), dict(measuring)])
    assert both["overlap_trial"] is done["overlap_trial"] and both["total_dw_tasks"] == 4
    assert "overlap measur" not in format_stats({"total_dw_tasks": 1})
