"""A logged subprocess that survives an outer timeout, and Megatron training-log parsing.

An outer `timeout` sends SIGTERM to the benchmark driver while a torchrun is still running: the
driver must stop that run and still keep what it logged (a lost finished run costs device time).
`install_sigterm()` turns SIGTERM into the `Terminated` exception in the main thread;
`run_logged` catches it, stops the child, and returns what it had.
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional


class Terminated(Exception):
    """Raised in the main thread on SIGTERM once `install_sigterm()` ran."""


def raise_terminated(signum, frame):
    raise Terminated()


def install_sigterm():
    """SIGTERM raises `Terminated`; returns the previous handler."""
    return signal.signal(signal.SIGTERM, raise_terminated)


def run_logged(
    cmd: list, env: dict, log_path: Path, cwd=None, timeout: Optional[float] = None
) -> dict:
    """Run `cmd` with stdout+stderr into `log_path` (first line: the command). On SIGTERM
    (`Terminated`) or after `timeout` seconds the child is terminated (killed 30 s later) and
    `terminated` / `timed_out` say so. Returns {rc, wall_s, terminated, timed_out}."""
    t0 = time.time()
    terminated = timed_out = False
    with open(log_path, "w") as log:
        log.write("COMMAND: " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            proc.wait(timeout=timeout)
        except (Terminated, subprocess.TimeoutExpired) as e:
            terminated = isinstance(e, Terminated)
            timed_out = not terminated
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "rc": proc.returncode,
        "wall_s": time.time() - t0,
        "terminated": terminated,
        "timed_out": timed_out,
    }


ITER_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
FIELD_RE = {
    "ms": re.compile(r"elapsed time per iteration \(ms\): ([\d.]+)"),
    "loss": re.compile(r"lm loss: ([\d.E+-]+)"),
    "grad_norm": re.compile(r"grad norm: ([\d.E+-]+)"),
    "tflops": re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([\d.]+)"),
}


def parse_megatron_log(text: str) -> dict:
    """{iteration: {ms, loss, grad_norm, tflops}} from Megatron's per-iteration log lines."""
    its = {}
    for m in ITER_RE.finditer(text):
        rec = {}
        for k, rx in FIELD_RE.items():
            f = rx.search(m.group(2))
            if f:
                rec[k] = float(f.group(1))
        its[int(m.group(1))] = rec
    return its


def steady_median(its: dict, key: str, after: int):
    """Median of `key` over iterations > `after` (the warm-up), None if none logged it."""
    v = [r[key] for i, r in its.items() if int(i) > after and key in r]
    return statistics.median(v) if v else None
