"""A short, seeded fuzz pass over every target of tests/fuzz/targets.py (the long runs are
tools/fuzz.py's): each input answered with a documented error or a result, within a second."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import targets as T

SHORT = {name: 150 for name in T.TARGETS} | {"checkpoint_state": 30, "request": 60, "gguf": 200}


@pytest.fixture(scope="module")
def world():
    return T.make_world()


@pytest.mark.parametrize("name", list(T.TARGETS))
def test_fuzz_target_short_run(world, name):
    report = T.run(world, name, SHORT[name], seed=1234, time_limit_s=2.0)
    assert report.inputs > 0
    assert not report.findings, [(kind, detail, data[:200]) for kind, detail, data in report.findings[:3]]


def _regressions():
    root = T.REGRESSIONS
    return sorted((p.parent.name, p) for p in root.glob("*/*") if p.is_file()) if root.is_dir() else []


@pytest.mark.parametrize("name, path", _regressions(), ids=lambda x: getattr(x, "name", x))
def test_inputs_that_once_failed_are_answered(world, name, path):
    """Every input a fuzz run once found (tests/fuzz/regressions/<target>/), replayed."""
    report = T.replay(world, name, [path.read_bytes()])
    assert not report.findings, report.findings[0][:2]


CHECK_MEMORY = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import targets as T
def allocating(world, data):
    np.ones(len(data) << 20, dtype=np.uint8)   # 1 MiB per input byte, touched
T.TARGETS["allocating"] = (allocating, T.mutate_bytes)
T.memory_bound = lambda size: 24 << 20
memory = T.MemoryProbe()
assert memory.available
assert not T.replay(None, "allocating", [b"x" * 8], memory=memory).findings
report = T.replay(None, "allocating", [b"x" * 64, b"x" * 8, b"x" * 64], memory=memory)
assert [kind for kind, _, _ in report.findings] == ["memory", "memory"], report.findings   # each time, not one peak
assert "64-byte input" in report.findings[0][1], report.findings[0][1]
assert 60 << 20 <= report.largest_growth < 80 << 20, report.largest_growth
"""


def test_an_input_that_allocates_beyond_its_bound_is_a_finding():
    """The long runs' memory check: an input whose resident peak exceeds what the process held before
    it by more than memory_bound(its size) is reported, every time, and one within it is not."""
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", CHECK_MEMORY, str(here)], capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-2000:]
