"""Generation speed: decode and prefill tokens/s of pyllm.Model against Hugging Face `transformers`
`generate` (with its KV cache) on the same GPT-2 weights, batch 1, the same threads, one run.

Decode: 64 new tokens after a 16-token prompt, greedy, both forced to generate all 64.
Prefill: one forward pass over a 128-token prompt (the first step of generation).
Also measured: the share of a decode step's time spent outside the C++ step (Python and numpy).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pyllm import kernels
from pyllm.model import KVCache, Model, ModelConfig

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))
SHAPES = {"small": ModelConfig.PRESETS["small"], "gpt2-124M": ModelConfig.PRESETS["gpt2"]}   # vocab 50304
VOCAB, DECODE, PROMPT, PREFILL = 50304, 64, 16, 128


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    L, H, C, T = SHAPES[request.param]
    model = Model(ModelConfig(vocab_size=VOCAB, block_size=T, n_layer=L, n_head=H, n_embd=C), seed=0)
    twin = None
    try:
        import torch
        import transformers

        from pyllm.io.hf import config_to_hf

        torch.set_num_threads(THREADS)
        twin = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(model.config)))
        twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=False)
        twin.tie_weights()
        twin.eval()
    except ImportError:
        pass
    return request.param, model, twin


def _prompt(n):
    return np.random.default_rng(0).integers(0, VOCAB, n)


@pytest.mark.parametrize("impl", ["pyllm", "transformers"])
def test_decode(benchmark, pair, impl):
    shape, model, twin = pair
    benchmark.group = f"decode {DECODE} tokens, {shape}, batch 1 vs transformers"
    # The bytes the decode steps read (both sides read the same weights and cache).
    benchmark.extra_info.update(impl=impl, tokens=DECODE, target=3.0,
                                bytes=DECODE * model.bytes_per_token(PROMPT + DECODE // 2))
    prompt = _prompt(PROMPT)
    if impl == "pyllm":
        out = benchmark.pedantic(lambda: model.generate(prompt, DECODE, temperature=0), rounds=3, warmup_rounds=1)
    else:
        if twin is None:
            pytest.skip("transformers/torch not installed")
        import torch

        ids = torch.from_numpy(prompt[None, :])

        def run():
            with torch.no_grad():
                return twin.generate(ids, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False,
                                     use_cache=True, pad_token_id=0)[0].numpy()
        out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
        assert out[PROMPT:PROMPT + 8].tolist() == model.generate(prompt, 8, temperature=0)[PROMPT:].tolist(), \
            "transformers and pyllm disagree on the greedy tokens: this would time different work"
    assert len(out) == PROMPT + DECODE


@pytest.mark.parametrize("impl", ["pyllm", "transformers"])
def test_prefill(benchmark, pair, impl):
    shape, model, twin = pair
    benchmark.group = f"prefill {PREFILL} tokens, {shape}, batch 1 vs transformers"
    benchmark.extra_info.update(impl=impl, tokens=PREFILL, target=1.0)
    prompt = _prompt(PREFILL)
    if impl == "pyllm":
        def run():
            return model.forward_step(prompt[None, :], KVCache(model.config, 1, PREFILL + 1))
        logits = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    else:
        if twin is None:
            pytest.skip("transformers/torch not installed")
        import torch

        def run():
            with torch.no_grad():
                return twin(torch.from_numpy(prompt[None, :]), use_cache=True).logits[:, -1].numpy()
        logits = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert logits.shape == (1, VOCAB)


def test_decode_time_outside_the_kernels(benchmark, pair):
    """Share of a decode step's wall time not spent inside the C++ step (Python and numpy glue):
    the step's own per-operation clock (forward_step's profile) against the wall clock."""
    shape, model, _ = pair
    from pyllm.models import STEP_OPERATIONS

    cache = KVCache(model.config, 1, PROMPT + DECODE + 1)
    model.forward_step(_prompt(PROMPT)[None, :], cache)
    token = np.array([[1]])
    profile = np.zeros(len(STEP_OPERATIONS))
    start = time.perf_counter()
    for _ in range(DECODE):
        logits = model.forward_step(token, cache, profile=profile)
        token[0, 0] = kernels.sample(logits[0], temperature=0)
    total = time.perf_counter() - start
    outside = 1 - 1e-9 * profile.sum() / total
    benchmark.extra_info.update(outside_kernels_share=outside, decode_step_ms=1e3 * total / DECODE)
    benchmark.group = f"decode step outside the kernels, {shape}"
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\n{shape}: decode step {1e3 * total / DECODE:.2f} ms, {100 * outside:.1f}% outside the C++ step")
    assert 0 <= outside < 1
