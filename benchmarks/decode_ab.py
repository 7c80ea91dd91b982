"""Decode and prompt speed of one GGUF file, for comparing two builds of pyllm back to back (run
it with each build's interpreter, on the same machine, one after the other):

    python benchmarks/decode_ab.py before SmolLM2-135M-Instruct.Q4_1.gguf

Best of three: 200 greedy tokens after 16 and after 500 prompt tokens, and the 500-token prompt
itself, on 2 threads. Written against pyllm's public model API only, so that an older checkout
runs it too. Not a pytest benchmark (bench_smollm2.py holds those, with llama.cpp beside them).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pyllm import kernels
from pyllm.data import read_default_corpus
from pyllm.llm import LLM
from pyllm.model import KVCache


def main(label: str, path: str) -> None:
    kernels.set_num_threads(2)
    llm = LLM.load(path)
    model, tokenizer = llm.model, llm.tokenizer
    dtype = getattr(model, "kv_dtype", None)   # older builds have only float32 caches

    def cache(n):
        return KVCache(model.config, 1, n) if dtype is None else KVCache(model.config, 1, n, dtype)

    ids = tokenizer.encode(read_default_corpus(20_000), disallowed_special=())[:500]

    def decode(context, n=200):
        kv = cache(context + n + 1)
        logits = model.forward_step(np.array([ids[:context]]), kv)
        token = np.array([[int(np.argmax(logits[0]))]])
        start = time.perf_counter()
        for _ in range(n):
            logits = model.forward_step(token, kv)
            token[0, 0] = int(np.argmax(logits[0]))
        return n / (time.perf_counter() - start)

    def prompt():
        kv = cache(len(ids) + 1)
        start = time.perf_counter()
        model.forward_step(np.array([ids]), kv)
        return 1e3 * (time.perf_counter() - start)

    short = max(decode(16) for _ in range(3))
    long = max(decode(500) for _ in range(3))
    ms = min(prompt() for _ in range(3))
    print(f"{label} {path}: decode after 16 {short:.0f} tok/s, after 500 {long:.0f} tok/s, "
          f"prompt of 500 {ms:.0f} ms")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
