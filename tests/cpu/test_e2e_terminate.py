"""Tier: cpu. benchmarks/e2e.py under an outer `timeout`: on SIGTERM the running variant is stopped
and what it logged so far is still parsed and returned (session 7 lost a finished run's numbers
when the driver was killed while it waited for torchrun to exit: raw/s7g)."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import benchmarks.e2e as e2e  # noqa: E402

FAKE_RUN = (
    "import sys, time\n"
    "for i in (1, 2, 3):\n"
    "    print(f' iteration {i:8d}/      40 | elapsed time per iteration (ms): {100 + i}.0 |"
    " lm loss: 9.0E+00 | grad norm: 1.5 |', flush=True)\n"
    "time.sleep(60)\n"
)


def test_sigterm_keeps_the_logged_iterations(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def fake_popen(cmd, **kw):  # the variant's torchrun replaced by a run that logs, then hangs
        return real_popen([sys.executable, "-c", FAKE_RUN], **kw)

    monkeypatch.setattr(e2e.subprocess, "Popen", fake_popen)
    previous = signal.signal(signal.SIGTERM, e2e._raise_terminated)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        r = e2e.run_variant("stock_ep2", tmp_path, 40, False, 2, tmp_path / "ckpt")
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert r["terminated"] is True
    assert r["rc"] is not None and r["rc"] != 0  # the run was stopped, not finished
    assert sorted(r["iterations"]) == [1, 2, 3]
    assert r["iterations"][3]["ms"] == 103.0 and r["wall_s"] < 40


def test_a_finished_run_is_not_terminated(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def fake_popen(cmd, **kw):
        return real_popen([sys.executable, "-c", FAKE_RUN.replace("time.sleep(60)", "")], **kw)

    monkeypatch.setattr(e2e.subprocess, "Popen", fake_popen)
    r = e2e.run_variant("stock_ep2", tmp_path, 40, False, 2, tmp_path / "ckpt")
    assert r["terminated"] is False and r["rc"] == 0 and len(r["iterations"]) == 3
