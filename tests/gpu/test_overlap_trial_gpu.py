"""Tier: gpu. `--fluid-overlap measure` on a GPU: the OverlapTrial's CUDA-event clock reads a
micro-batch's time only once its end event completed, without synchronizing the device, and
decides for the setting whose micro-batches took less GPU time. The micro-batches are
`torch.cuda._sleep` kernels of known length (on: 2 ms, off: 4 ms, then the reverse), queued by a
host that spends 1.5 ms per micro-batch, so it runs ahead of the GPU and most end events are not
yet complete when the next micro-batch starts; a read that waited for the device would show in
the sync counter."""

import time

import pytest
import torch

from tests.gpu._torchrun import require_gpus


@pytest.mark.parametrize("on_ms,off_ms", [(2.0, 4.0), (4.0, 2.0)])
def test_cuda_clock_decides_without_syncing(monkeypatch, on_ms, off_ms):
    require_gpus(1)
    from fluid.schedule.overlap_trial import CudaClock, OverlapTrial

    torch.cuda.init()
    torch.cuda._sleep(1000)  # the clock rate: cycles per ms, measured once
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)

    syncs = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1) or real(*a))
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: syncs.append(1))
    trial = OverlapTrial(warmup=1, samples=2, clock=CudaClock())
    for _ in range(60):
        trial.start_microbatch()
        c = trial.choice()
        torch.cuda._sleep(int(cycles_per_ms * (on_ms if c else off_ms)))
        trial.end_backward()
        time.sleep(1.5e-3)
        if not trial.measuring:
            break
    assert syncs == []
    assert trial.decision is (on_ms < off_ms), trial.stats()
    s = trial.stats()
    for ms, want in ((s["on_ms"], on_ms), (s["off_ms"], off_ms)):
        assert len(ms) >= 2 and all(abs(t - want) < 0.5 * want for t in ms), s
