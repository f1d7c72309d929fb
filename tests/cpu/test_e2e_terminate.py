"""Tier: cpu. The benchmark launcher (fluid.testing.bench.launch, used by benchmarks/run.py for every
torchrun) under an outer `timeout`: on SIGTERM the running child is stopped and what it logged so
far is still there to parse (a driver killed while it waited for torchrun to exit once lost a
finished run's numbers); a child past its own timeout is stopped the same way."""

import os
import signal
import sys
import threading

from fluid.testing.bench import launch

FAKE_RUN = (
    "import sys, time\n"
    "for i in (1, 2, 3):\n"
    "    print(f' iteration {i:8d}/      40 | elapsed time per iteration (ms): {100 + i}.0 |"
    " lm loss: 9.0E+00 | grad norm: 1.5 |', flush=True)\n"
    "time.sleep(60)\n"
)


def _parsed(log):
    return launch.parse_megatron_log(log.read_text())


def test_sigterm_keeps_the_logged_iterations(tmp_path):
    log = tmp_path / "run.log"
    previous = launch.install_sigterm()
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        r = launch.run_logged([sys.executable, "-c", FAKE_RUN], dict(os.environ), log)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert r["terminated"] is True and r["timed_out"] is False
    assert r["rc"] is not None and r["rc"] != 0  # the run was stopped, not finished
    its = _parsed(log)
    assert sorted(its) == [1, 2, 3]
    assert its[3]["ms"] == 103.0 and r["wall_s"] < 40
    assert launch.steady_median(its, "ms", after=1) == 102.5


def test_a_child_past_its_timeout_is_stopped(tmp_path):
    log = tmp_path / "run.log"
    r = launch.run_logged([sys.executable, "-c", FAKE_RUN], dict(os.environ), log, timeout=3)
    assert r["timed_out"] is True and r["terminated"] is False and r["wall_s"] < 40
    assert sorted(_parsed(log)) == [1, 2, 3]


def test_a_finished_run_is_not_terminated(tmp_path):
    log = tmp_path / "run.log"
    r = launch.run_logged(
        [sys.executable, "-c", FAKE_RUN.replace("time.sleep(60)", "")], dict(os.environ), log
    )
    assert r["terminated"] is False and r["timed_out"] is False and r["rc"] == 0
    assert len(_parsed(log)) == 3 and log.read_text().startswith("COMMAND: ")
