"""What seeing inside costs: LLM.explain on the default model (SmolLM2-135M-Instruct, Q4_1) against
the plain forward pass it wraps (Model(ids): the logits at every position), on the same prompt, in
one run: "Dogs are" (2 tokens) and a 128-token prompt, the attention maps of all 30 layers x 9 heads
and the logit lens of every layer included. The ratio is the overhead of keeping the insides.

Run: pytest benchmarks/bench_explain.py --benchmark-json F; python benchmarks/report.py F. Its speedup
column reads forward time / explain time: below 1, explain takes 1/speedup times the forward pass.
"""

from __future__ import annotations

import pytest

PROMPTS = {"dogs": "Dogs are", "128": None}


@pytest.fixture(scope="module")
def llm():
    from pyllm.hub import smollm2_gguf
    from pyllm.llm import LLM
    return LLM.load(smollm2_gguf(quiet=True))


def _prompt(llm, name: str) -> str:
    if PROMPTS[name]:
        return PROMPTS[name]
    from pyllm.data import read_default_corpus
    ids = llm.tokenizer.encode(read_default_corpus(4000), disallowed_special=())[:128]
    return llm.tokenizer.decode(ids)


@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("side", ["forward", "explain"])
def test_explain_against_the_forward_pass(benchmark, llm, name, side):
    prompt = _prompt(llm, name)
    ids = llm.encode_prompt(prompt)
    benchmark.group = f"explain {name} ({len(ids)} tokens)"
    benchmark.extra_info.update(impl="pyllm" if side == "explain" else "Model(ids)")
    if side == "forward":
        benchmark.pedantic(lambda: llm.model(ids), rounds=10, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: llm.explain(prompt), rounds=10, warmup_rounds=1)
