"""A short, seeded fuzz pass over every target of tests/fuzz/targets.py (the long runs are
tools/fuzz.py's): each input answered with a documented error or a result, within a second."""

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
