"""The Qwen2 and Qwen3 families in pyllm against llama.cpp (llama-cpp-python) on the same GGUF file,
the same threads, one run: a prompt of 500 tokens and 200 greedy decode steps after 16, as
bench_smollm2.py measures the default model.

No Qwen file can be fetched here (no network but PyPI), so each file is a model of SmolLM2-135M's
shape (30 layers, 576 wide, 9 heads, 3 key/value heads, SwiGLU 1536, its 49 152-token vocabulary)
in the family's architecture (Qwen2: q/k/v biases; Qwen3: q/k head norms), random weights from a
fixed seed, written by pyllm's own exporter as Q8_0 (`Model.save_gguf`) and cached under
~/.cache/pyllm/bench/. Speed does not depend on what the weights say. Needs llama-cpp-python and
the gguf package; skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bench_smollm2 as S

FAMILIES = ("qwen2", "qwen3")
CACHE = Path.home() / ".cache" / "pyllm" / "bench"


def family_file(arch: str) -> Path:
    """The Q8_0 GGUF of a random model of SmolLM2-135M's shape in `arch` (made once)."""
    from pyllm.llm import LLM
    from pyllm.model import Model, ModelConfig

    path = CACHE / f"{arch}-135m-random.Q8_0.gguf"
    if path.exists():
        return path
    base = LLM.load(S._path("Q4_1"))   # for its tokenizer and chat template
    shape = ModelConfig.SHAPED_PRESETS["smollm2-135m"]
    cfg = ModelConfig(**{**shape, "arch": arch, "vocab_size": base.model.config.vocab_size, "block_size": 2048})
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
    tokenizer, prefill, decode, _ = S.load_file(impl, family_file(arch))
    return impl, arch, S._prompt_ids(tokenizer), prefill, decode


def test_prompt_processing(benchmark, runner):
    impl, arch, ids, prefill, _ = runner
    benchmark.group = f"{arch} (SmolLM2-135M shape) Q8_0 prompt of {S.PROMPT} tokens vs llama.cpp"
    benchmark.extra_info.update(impl=impl, tokens=S.PROMPT, target=1.5)
    benchmark.pedantic(prefill, args=(ids,), rounds=3, warmup_rounds=1)


def test_decode(benchmark, runner):
    impl, arch, ids, prefill, decode = runner
    benchmark.group = f"{arch} (SmolLM2-135M shape) Q8_0 decode {S.DECODE} tokens after {S.SHORT_PROMPT} vs llama.cpp"
    benchmark.extra_info.update(impl=impl, tokens=S.DECODE, target=1.5)
    tokens = benchmark.pedantic(decode, setup=lambda: ((prefill(ids[:S.SHORT_PROMPT]), S.DECODE), {}), rounds=5)
    assert len(tokens) == S.DECODE
