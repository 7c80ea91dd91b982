"""Peak memory of a benchmark's workload, measured in a fresh process (interpreter and libraries
included, as a user would see it). Not a benchmark itself (pytest collects only bench_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def vmhwm_mb() -> float:
    """This process image's peak resident set (VmHWM): ru_maxrss would count a forked parent's pages too."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def report() -> None:
    """Prints the peak as the last line of output, where peak_memory_mb reads it."""
    print(json.dumps({"peak_mb": vmhwm_mb()}))


def peak_memory_mb(script: str, *args: str, threads: int = 2) -> float:
    """Runs `python script args...` (which ends with report()) and returns its peak in MB."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *args], check=True, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(script)),
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
