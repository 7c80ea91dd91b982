"""The default model, SmolLM2-135M-Instruct (GGUF), in pyllm against llama.cpp (through
llama-cpp-python) on the same file, the same threads, one run: prompt processing of 500 tokens (the
last position's logits on both sides), 200 greedy decode steps after a short prompt, and the resident
memory of each (a fresh process that loads the model and runs a short generation). Three files: the
Q4_1 one the default model ships as, and the Q4_K_M and Q8_0 files llama.cpp's quantizer makes from
it (tools/quantize_smollm2.py). And pyllm's batched decode: 8 sequences of different lengths decoded
together against the same 8 decoded one after another (the same tokens; the speedup is the ratio of
tokens/s). And decode with another process keeping one core busy, on 2 threads against 1.

llama-cpp-python compiles llama.cpp when pip installs it (minutes); without it the llama.cpp rows
and the requantized files are skipped. Run as a script for the memory probe:
python benchmarks/bench_smollm2.py {pyllm|llama.cpp} [Q4_1|Q4_K_M|Q8_0].
"""

from __future__ import annotations

import os
import sys

import numpy as np

import memory_probe

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))
PROMPT, SHORT_PROMPT, DECODE = 500, 16, 200
BATCH, BATCH_STEPS = 8, 64
QUANTS = ("Q4_1", "Q4_K_M", "Q8_0")


def _path(quant: str = "Q4_1"):
    from pyllm.hub import smollm2_gguf

    path = smollm2_gguf(quiet=True)
    if quant != "Q4_1":
        made = path.with_name(f"SmolLM2-135M-Instruct.{quant}.gguf")
        if not made.exists():
            import subprocess
            from pathlib import Path

            tool = Path(__file__).resolve().parents[1] / "tools" / "quantize_smollm2.py"
            subprocess.run([sys.executable, str(tool), quant, str(made)], check=True, capture_output=True)
        path = made
    return path


def _prompt_ids(tokenizer) -> list[int]:
    from pyllm.data import read_default_corpus

    return tokenizer.encode(read_default_corpus(20_000), disallowed_special=())[:PROMPT]


def load(impl: str, quant: str = "Q4_1"):
    """(tokenizer, prefill(ids) -> state, decode(state, n) -> tokens, model or None) for impl on the
    file of that quantization."""
    return load_file(impl, _path(quant))


def load_file(impl: str, path, n_ctx: int = PROMPT + DECODE + 8):
    """load() for any GGUF file; n_ctx: llama.cpp's context (pyllm sizes each cache to its prompt)."""
    if impl == "pyllm":
        from pyllm import kernels
        from pyllm.llm import LLM
        from pyllm.models import KVCache

        kernels.set_num_threads(THREADS)
        llm = LLM.load(path)
        model = llm.model

        def prefill(ids):
            cache = KVCache(model.config, 1, len(ids) + DECODE + 1, model.kv_dtype)
            return cache, model.forward_step(np.asarray(ids)[None, :], cache)

        def decode(state, n):
            cache, logits = state
            out = []
            for _ in range(n):
                token = int(np.argmax(logits[0]))
                out.append(token)
                logits = model.forward_step(np.array([[token]]), cache)
            return out
        return llm.tokenizer, prefill, decode, model

    import llama_cpp

    from pyllm.tokenizer import Tokenizer

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=THREADS,
                          n_threads_batch=THREADS, n_batch=512, verbose=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return llm

    def last_logits():   # llm.scores is only filled when every position's logits are kept
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))

    def decode(state, n):
        out = []
        for _ in range(n):
            token = int(np.argmax(last_logits()))
            out.append(token)
            llm.eval([token])
        return out
    return Tokenizer.from_gguf(path), prefill, decode, None


def batch_prompts(ids: list[int]) -> list[list[int]]:
    """BATCH prompts of different lengths (24 to 444 tokens) cut from the benchmark's text."""
    return [ids[7 * b:7 * b + 24 + 60 * b] for b in range(BATCH)]


def prefill_batch(model, prompts: list[list[int]], steps: int, together: bool) -> list:
    """The prompts in one cache of len(prompts) rows (together) or one cache each, each with its
    last position's logits: the state decode_batch starts from (untimed: the same work either way)."""
    from pyllm.models import KVCache

    capacity = max(map(len, prompts)) + steps + 1
    if together:
        cache = KVCache(model.config, len(prompts), capacity, model.kv_dtype)
        last = np.stack([model.forward_step(np.array([p]), cache, rows=slice(b, b + 1))[0]
                         for b, p in enumerate(prompts)])
        return [(cache, last)]
    states = []
    for p in prompts:
        cache = KVCache(model.config, 1, capacity, model.kv_dtype)
        states.append((cache, model.forward_step(np.array([p]), cache)))
    return states


def decode_batch(model, states: list, steps: int) -> np.ndarray:
    """Greedy decode for `steps` tokens from each state of prefill_batch, one after another (one
    state: all its rows at each step); returns every row's tokens, (rows, steps)."""
    out = []
    for cache, last in states:
        tokens = np.zeros((len(last), steps), np.int64)
        for s in range(steps):
            tokens[:, s] = last.argmax(1)
            last = model.forward_step(tokens[:, s:s + 1], cache)
        out.append(tokens)
    return np.concatenate(out)


def peak_memory_mb(*args: str) -> float:
    return memory_probe.peak_memory_mb(__file__, *args, threads=THREADS)


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", params=[(impl, q) for q in QUANTS for impl in ("pyllm", "llama.cpp")],
                    ids=lambda p: "-".join(p))
    def runner(request):
        impl, quant = request.param
        if impl == "llama.cpp" or quant != "Q4_1":
            pytest.importorskip("llama_cpp")
        tokenizer, prefill, decode, _ = load(impl, quant)
        return impl, quant, _prompt_ids(tokenizer), prefill, decode

    @pytest.fixture(scope="module")
    def token_bytes():
        """quantization -> the bytes a decode step of pyllm's reads, half-way through the decode."""
        from pyllm.model import Model

        counts = {}
        for quant in QUANTS:
            if quant != "Q4_1" and not _importable("llama_cpp"):
                continue
            counts[quant] = Model.from_pretrained(_path(quant)).bytes_per_token(SHORT_PROMPT + DECODE // 2)
        return counts

    def _importable(name):
        import importlib.util

        return importlib.util.find_spec(name) is not None

    def test_prompt_processing(benchmark, runner):
        impl, quant, ids, prefill, _ = runner
        benchmark.group = f"SmolLM2 {quant} prompt of {PROMPT} tokens vs llama.cpp"
        benchmark.extra_info.update(impl=impl, tokens=PROMPT, target=1.5, peak_mb=peak_memory_mb(impl, quant))
        benchmark.pedantic(prefill, args=(ids,), rounds=3, warmup_rounds=1)

    def test_decode(benchmark, runner, token_bytes):
        impl, quant, ids, prefill, decode = runner
        benchmark.group = f"SmolLM2 {quant} decode {DECODE} tokens after {SHORT_PROMPT} vs llama.cpp"
        # The bytes the decode steps read, pyllm's count for both (the same file, a float16 cache).
        benchmark.extra_info.update(impl=impl, tokens=DECODE, target=1.5, bytes=DECODE * token_bytes[quant])
        tokens = benchmark.pedantic(decode, setup=lambda: ((prefill(ids[:SHORT_PROMPT]), DECODE), {}), rounds=5)
        assert len(tokens) == DECODE

    @pytest.fixture(scope="module")
    def batched():
        tokenizer, _, _, model = load("pyllm", "Q4_1")
        prompts = batch_prompts(_prompt_ids(tokenizer))
        # Together or one at a time, the same tokens (a row's logits do not depend on the batch):
        # both sides do the same work.
        expected = decode_batch(model, prefill_batch(model, prompts, BATCH_STEPS, False), BATCH_STEPS)
        return model, prompts, expected

    @pytest.mark.parametrize("together", [True, False], ids=["together", "one at a time"])
    def test_batched_decode(benchmark, batched, together):
        model, prompts, expected = batched
        benchmark.group = f"SmolLM2 Q4_1 {BATCH} sequences decode {BATCH_STEPS} tokens together vs one at a time"
        benchmark.extra_info.update(impl="pyllm" if together else "one at a time", tokens=BATCH * BATCH_STEPS,
                                    target=4.0)
        tokens = benchmark.pedantic(
            decode_batch, setup=lambda: ((model, prefill_batch(model, prompts, BATCH_STEPS, together), BATCH_STEPS),
                                         {}), rounds=3)
        assert np.array_equal(tokens, expected)


    @pytest.fixture(scope="module")
    def busy_core():
        """SmolLM2 Q4_1 and a prompt, while another process keeps one core busy."""
        import subprocess
        import time

        tokenizer, prefill, decode, model = load("pyllm", "Q4_1")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        yield prefill, decode, _prompt_ids(tokenizer)[:SHORT_PROMPT]
        hog.kill()
        hog.wait()

    @pytest.mark.parametrize("threads", [2, 1], ids=["2 threads", "1 thread"])
    def test_decode_with_a_busy_core(benchmark, busy_core, threads):
        from pyllm import kernels

        prefill, decode, ids = busy_core
        benchmark.group = f"SmolLM2 Q4_1 decode {DECODE} tokens, one core busy: 2 threads vs 1"
        benchmark.extra_info.update(impl="pyllm" if threads == 2 else "1 thread", tokens=DECODE, target=1.0)

        def setup():
            kernels.set_num_threads(threads)
            return (prefill(ids), DECODE), {}
        try:
            benchmark.pedantic(decode, setup=setup, rounds=5)
        finally:
            kernels.set_num_threads(THREADS)


if __name__ == "__main__":
    tokenizer, prefill, decode, _ = load(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Q4_1")
    decode(prefill(_prompt_ids(tokenizer)[:64]), 16)
    memory_probe.report()
