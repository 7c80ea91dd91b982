"""The Qwen2, Qwen3 and Gemma 3 families in pyllm against llama.cpp (llama-cpp-python) on the same
GGUF file, the same threads, one run: a prompt of 500 tokens and 200 greedy decode steps after 16,
as bench_smollm2.py measures the default model; for Gemma 3 also 64 decode steps after a prompt of
2000 tokens, four times its sliding window (both keep only the window of its sliding layers).

No such file can be fetched here (no network but PyPI), so each is a random model (fixed seed) in
the family's architecture with SmolLM2's 49 152-token vocabulary: Qwen2 (q/k/v biases) and Qwen3
(q/k head norms) of SmolLM2-135M's shape (30 layers, 576 wide, 9 heads, 3 key/value heads, SwiGLU
1536); Gemma 3 of Gemma 3 270M's (18 layers, 640 wide, 4 heads, 1 key/value head of 256, GeGLU
2048, window 512, every sixth layer global). Written by pyllm's own exporter as Q8_0
(`Model.save_gguf`) and cached under ~/.cache/pyllm/bench/. Speed does not depend on what the
weights say. Needs llama-cpp-python and the gguf package; skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bench_smollm2 as S

FAMILIES = ("qwen2", "qwen3", "gemma3")
SHAPES = {"qwen2": "smollm2-135m", "qwen3": "smollm2-135m", "gemma3": "gemma3-270m"}
LONG_PROMPT, LONG_DECODE = 2000, 64
CACHE = Path.home() / ".cache" / "pyllm" / "bench"


def family_file(arch: str) -> Path:
    """The Q8_0 GGUF of a random model of SmolLM2-135M's shape in `arch` (made once)."""
    from pyllm.llm import LLM
    from pyllm.model import Model, ModelConfig

    path = CACHE / f"{arch}-{SHAPES[arch].split('-')[1]}-random.Q8_0.gguf"
    if path.exists():
        return path
    base = LLM.load(S._path("Q4_1"))   # for its tokenizer and chat template
    shape = ModelConfig.SHAPED_PRESETS[SHAPES[arch]]
    cfg = ModelConfig(**{**shape, "arch": arch, "vocab_size": base.model.config.vocab_size, "block_size": 4096})
    model = Model(cfg, seed=0)
    rng = np.random.default_rng(1)
    for spec in model.specs:   # biases and norms off their initial values, as trained ones are
        if not spec.decay and "embed" not in spec.name:
            model.p[spec.name][...] += rng.standard_normal(spec.shape).astype(np.float32) * 0.05
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_gguf(path, "q8_0", base.tokenizer, base.chat_template, base.stop_token_ids[0], progress=False)
    return path


@pytest.fixture(scope="module", params=[(impl, a) for a in FAMILIES for impl in ("pyllm", "llama.cpp")],
                ids=lambda p: "-".join(p))
def runner(request):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    impl, arch = request.param
    tokenizer, prefill, decode, _ = S.load_file(impl, family_file(arch), n_ctx=LONG_PROMPT + LONG_DECODE + 8)
    return impl, arch, S._prompt_ids(tokenizer), prefill, decode


def test_prompt_processing(benchmark, runner):
    impl, arch, ids, prefill, _ = runner
    benchmark.group = f"{arch} ({SHAPES[arch]} shape) Q8_0 prompt of {S.PROMPT} tokens vs llama.cpp"
    benchmark.extra_info.update(impl=impl, tokens=S.PROMPT, target=1.5)
    benchmark.pedantic(prefill, args=(ids,), rounds=3, warmup_rounds=1)


def test_decode(benchmark, runner):
    impl, arch, ids, prefill, decode = runner
    benchmark.group = f"{arch} ({SHAPES[arch]} shape) Q8_0 decode {S.DECODE} tokens after {S.SHORT_PROMPT} vs llama.cpp"
    benchmark.extra_info.update(impl=impl, tokens=S.DECODE, target=1.5)
    tokens = benchmark.pedantic(decode, setup=lambda: ((prefill(ids[:S.SHORT_PROMPT]), S.DECODE), {}), rounds=5)
    assert len(tokens) == S.DECODE


def test_decode_past_the_window(benchmark, runner):
    impl, arch, ids, prefill, decode = runner
    if arch != "gemma3":
        pytest.skip("only Gemma 3 here has sliding-window layers")
    long_ids = (ids * (LONG_PROMPT // len(ids) + 1))[:LONG_PROMPT]
    benchmark.group = f"{arch} ({SHAPES[arch]} shape) Q8_0 decode {LONG_DECODE} tokens after {LONG_PROMPT} vs llama.cpp"
    benchmark.extra_info.update(impl=impl, tokens=LONG_DECODE, target=1.5)
    tokens = benchmark.pedantic(decode, setup=lambda: ((prefill(long_ids), LONG_DECODE), {}), rounds=3)
    assert len(tokens) == LONG_DECODE
