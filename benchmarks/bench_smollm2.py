"""The default model, SmolLM2-135M-Instruct Q4_1 (GGUF), in pyllm against llama.cpp (through
llama-cpp-python) on the same file, the same threads, one run: prompt processing of 500 tokens,
200 greedy decode steps, and the resident memory of each (a fresh process that loads the model
and runs a short generation). The same for a Q4_K_M file of the model that llama.cpp's quantizer
makes from it (tools/make_q4_k_m.py; Q4_K, Q6_K, Q5_0 and Q8_0 tensors).

llama-cpp-python compiles llama.cpp when pip installs it (minutes); without it the llama.cpp rows
and the Q4_K_M file are skipped. Run as a script for the memory probe:
python benchmarks/bench_smollm2.py {pyllm|llama.cpp} [Q4_1|Q4_K_M].
"""

from __future__ import annotations

import os
import sys

import numpy as np

import memory_probe

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))
PROMPT, DECODE = 500, 200


def _path(quant: str = "Q4_1"):
    from pyllm.hub import smollm2_gguf

    path = smollm2_gguf(quiet=True)
    if quant == "Q4_K_M":
        made = path.with_name("SmolLM2-135M-Instruct.Q4_K_M.gguf")
        if not made.exists():
            import subprocess
            from pathlib import Path

            tool = Path(__file__).resolve().parents[1] / "tools" / "make_q4_k_m.py"
            subprocess.run([sys.executable, str(tool), str(made)], check=True, capture_output=True)
        path = made
    return path


def _prompt_ids(tokenizer) -> list[int]:
    from pyllm.data import read_default_corpus

    return tokenizer.encode(read_default_corpus(20_000), disallowed_special=())[:PROMPT]


def load(impl: str, quant: str = "Q4_1"):
    """(prefill(ids) -> state, decode(state, n) -> tokens) for impl on the file of that quantization."""
    if impl == "pyllm":
        from pyllm import kernels
        from pyllm.llm import LLM
        from pyllm.model import KVCache

        kernels.set_num_threads(THREADS)
        llm = LLM.load(_path(quant))
        model = llm.model

        def prefill(ids):
            cache = KVCache(model.config, 1, len(ids) + DECODE + 1)
            return cache, model.forward_step(np.asarray(ids)[None, :], cache)

        def decode(state, n):
            cache, logits = state
            out = []
            for _ in range(n):
                token = int(np.argmax(logits[0]))
                out.append(token)
                logits = model.forward_step(np.array([[token]]), cache)
            return out
        return llm.tokenizer, prefill, decode

    import llama_cpp

    from pyllm.tokenizer import Tokenizer

    llm = llama_cpp.Llama(model_path=str(_path(quant)), n_ctx=PROMPT + DECODE + 8, n_threads=THREADS,
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
    return Tokenizer.from_gguf(_path(quant)), prefill, decode


def peak_memory_mb(*args: str) -> float:
    return memory_probe.peak_memory_mb(__file__, *args, threads=THREADS)


try:
    import pytest
except ImportError:
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", params=[("pyllm", "Q4_1"), ("llama.cpp", "Q4_1"), ("pyllm", "Q4_K_M"),
                                            ("llama.cpp", "Q4_K_M")], ids=lambda p: "-".join(p))
    def runner(request):
        impl, quant = request.param
        if impl == "llama.cpp" or quant == "Q4_K_M":
            pytest.importorskip("llama_cpp")
        tokenizer, prefill, decode = load(impl, quant)
        return impl, quant, _prompt_ids(tokenizer), prefill, decode

    def test_prompt_processing(benchmark, runner):
        impl, quant, ids, prefill, _ = runner
        benchmark.group = f"SmolLM2 {quant} prompt of {PROMPT} tokens vs llama.cpp"
        benchmark.extra_info.update(impl=impl, tokens=PROMPT, target=0.5, peak_mb=peak_memory_mb(impl, quant))
        benchmark.pedantic(prefill, args=(ids,), rounds=3, warmup_rounds=1)

    def test_decode(benchmark, runner):
        impl, quant, ids, prefill, decode = runner
        benchmark.group = f"SmolLM2 {quant} decode {DECODE} tokens vs llama.cpp"
        benchmark.extra_info.update(impl=impl, tokens=DECODE, target=0.8)
        tokens = benchmark.pedantic(decode, setup=lambda: ((prefill(ids), DECODE), {}), rounds=5)
        assert len(tokens) == DECODE


if __name__ == "__main__":
    tokenizer, prefill, decode = load(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Q4_1")
    decode(prefill(_prompt_ids(tokenizer)[:64]), 16)
    memory_probe.report()
