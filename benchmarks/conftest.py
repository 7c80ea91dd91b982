"""Session set-up for the kernel benchmarks: one thread count for pyllm and numpy, one measured FMA peak
and memory read bandwidth, and the machine facts (written into the benchmark JSON) that
benchmarks/report.py prints.

Not where benchmarks, shapes or tolerances live: those are the cases in bench_kernels.py.
"""

from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import pytest

import pyllm

try:
    import pyllm.kernels as kernels
except ImportError as exc:  # the usual cause: the source tree shadows the installed package
    raise ImportError(
        f"the benchmarks need the built extension; `import pyllm.kernels` failed for pyllm at "
        f"{list(pyllm.__path__)} (install it with `pip install .` and run the "
        f"`pytest` executable, not `python -m pytest`, from the repository root): {exc}"
    ) from exc

# One thread count for both sides, so a speedup is never "more cores against fewer".
THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))

# Filled once by the `machine` fixture; copied into the JSON's machine_info at the end of the run.
FACTS: dict = {}


def _cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo (x86), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _openblas_symbol():
    """numpy's own OpenBLAS as a function name -> ctypes function lookup, or None.

    numpy's wheels ship OpenBLAS under a prefixed, suffixed name (scipy_openblas_*64_), so the
    library loaded into this process is found in /proc/self/maps and the spelling is probed.
    None on a numpy built against another BLAS (MKL, Accelerate): then its threads are its own.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            if hasattr(lib, f"{prefix}_set_num_threads{suffix}"):
                return lambda name, lib=lib, p=prefix, s=suffix: getattr(lib, f"{p}_{name}{s}")
    return None


_BLAS = None  # numpy's OpenBLAS symbol lookup, found once by `machine`


def set_numpy_blas_threads(n: int) -> None:
    """Sets numpy's OpenBLAS thread count for what follows (no-op for another BLAS)."""
    if _BLAS is not None:
        _BLAS("set_num_threads")(ctypes.c_int(n))


@pytest.fixture(scope="session", autouse=True)
def machine():
    """Sets pyllm's and numpy's thread counts once, measures the FMA peak once; returns FACTS."""
    global _BLAS
    kernels.set_num_threads(THREADS)
    blas, blas_name, blas_threads = _openblas_symbol(), "unknown", None
    _BLAS = blas
    if blas is not None:
        blas("set_num_threads")(ctypes.c_int(THREADS))
        blas("get_num_threads").restype = ctypes.c_int
        blas("get_corename").restype = ctypes.c_char_p
        blas_threads = blas("get_num_threads")()
        blas_name = f"OpenBLAS {blas('get_corename')().decode()}"
    FACTS.update(
        cpu_model=_cpu_model(),
        threads=kernels.get_num_threads(),
        isa=kernels.get_isa(),
        fma_peak_gflops=float(kernels.measure_fma_peak(0.5)),
        # The best of three: other guests on a shared host only ever lower it.
        read_bandwidth_gbps=max(float(kernels.measure_read_bandwidth(0.3)) for _ in range(3)),
        numpy_version=np.__version__,
        numpy_blas=blas_name,
        numpy_blas_threads=blas_threads,
        # OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE...: can pin numpy to a slower kernel; report.py warns.
        openblas_overrides={k: v for k, v in os.environ.items()
                            if k.startswith("OPENBLAS") and k != "OPENBLAS_NUM_THREADS"},
        pyllm_kernels=kernels.__file__,
    )
    return FACTS


def pytest_report_header(config):
    return (f"pyllm.kernels: {kernels.__file__} (ISA {kernels.get_isa()}); "
            f"threads: PYLLM_BENCH_THREADS={THREADS} for pyllm and numpy's OpenBLAS")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["pyllm_bench"] = dict(FACTS)
