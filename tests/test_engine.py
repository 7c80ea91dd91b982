"""The continuous-batching engine: requests that run together get what each gets alone, the prefix
cache changes nothing but the work, and requests end as asked (stop, length, cancel)."""

import threading

import numpy as np
import pytest

from pyllm.engine import Engine, EngineConfig, QueueFull, Request
from pyllm.generate import SamplingConfig
from pyllm.model import Model, ModelConfig


@pytest.fixture(scope="module")
def model():
    m = Model(ModelConfig(arch="llama", vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          intermediate_size=48), seed=0)
    m.params[...] += np.random.default_rng(1).standard_normal(m.params.size).astype(np.float32) * 0.05
    return m


def _alone(model, prompt, n, **sampling):
    out = model.generate(prompt, n, **sampling)
    return out[len(prompt):].tolist()


GREEDY = SamplingConfig(temperature=0)


def test_requests_running_together_get_what_each_gets_alone(model):
    prompts = [[1, 2, 3], [9] * 20, list(range(5, 40)), [4, 4], [7, 8, 9, 10, 11]]
    engine = Engine(model, EngineConfig(max_batch=3, prefix_rows=1, prefill_chunk=8))
    try:
        handles = [engine.submit(Request(p, 12, GREEDY)) for p in prompts]
        seeded = [engine.submit(Request(p, 10, SamplingConfig(temperature=0.9, top_k=20), seed=s))
                  for s, p in enumerate(prompts[:3])]
        for p, h in zip(prompts, handles):
            assert h.tokens() == _alone(model, p, 12, temperature=0)
        for s, (p, h) in enumerate(zip(prompts, seeded)):
            assert h.tokens() == _alone(model, p, 10, temperature=0.9, top_k=20, seed=s)
        assert engine.stats.finished == 8 and engine.stats.running == 0
        assert engine.stats.batch_rows > engine.stats.steps   # rows really decoded together
    finally:
        engine.close()


def test_a_continued_conversation_reuses_its_prefix_and_answers_the_same(model):
    engine = Engine(model, EngineConfig(max_batch=2, prefix_rows=2))
    try:
        first = [3, 1, 4, 1, 5, 9, 2, 6]
        reply = engine.submit(Request(first, 6, GREEDY)).tokens()
        follow = first + reply + [7, 7, 7]
        handle = engine.submit(Request(follow, 6, GREEDY))
        assert handle.tokens() == _alone(model, follow, 6, temperature=0)
        assert handle.cached_tokens == len(first) + len(reply) - 1   # all it fed: the last reply token was not
        other = engine.submit(Request([50, 51], 3, GREEDY))
        assert other.tokens() == _alone(model, [50, 51], 3, temperature=0) and other.cached_tokens == 0
    finally:
        engine.close()


def test_requests_end_at_stop_tokens_length_and_cancel(model):
    engine = Engine(model, EngineConfig(max_batch=2))
    try:
        free = _alone(model, [1, 2, 3], 10, temperature=0)
        stop = free[4]
        events = list(engine.submit(Request([1, 2, 3], 10, GREEDY, stop_tokens=[stop])))
        assert [e.token for e in events[:-1]] == free[:free.index(stop) + 1] and events[-1].finish == "stop"
        events = list(engine.submit(Request([1, 2, 3], 3, GREEDY)))
        assert len(events) == 4 and events[-1].finish == "length"
        long = engine.submit(Request([5], 10_000, GREEDY))     # ends at the context window
        assert len(long.tokens()) == 63
        handle = engine.submit(Request([1, 2], 10_000, GREEDY))
        next(iter(handle))
        handle.cancel()
        assert list(handle)[-1].finish == "cancelled"
    finally:
        engine.close()


def test_logprobs_are_the_model_distribution_and_masks_constrain_the_choice(model):
    engine = Engine(model, EngineConfig())
    try:
        prompt = [10, 20, 30]
        events = list(engine.submit(Request(prompt, 1, GREEDY, logprobs=3)))
        logits = model(np.array([prompt]))[0, -1].astype(np.float64)
        want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert events[0].logprob == pytest.approx(want[events[0].token], abs=1e-4)
        assert [t for t, _ in events[0].top] == list(np.argsort(-want)[:3])
        allowed = np.zeros(97, bool)
        allowed[[5, 6]] = True
        tokens = engine.submit(Request(prompt, 5, SamplingConfig(temperature=1.0), seed=1,
                                       mask=lambda generated: allowed)).tokens()
        assert set(tokens) <= {5, 6} and len(tokens) == 5
    finally:
        engine.close()


def test_bad_requests_are_refused_and_a_full_queue_says_so(model):
    engine = Engine(model, EngineConfig(max_batch=1, max_queue=2))
    try:
        for bad, match in (([], "non-empty"), ([97], "outside"), (list(range(64)), "at most 63")):
            with pytest.raises(ValueError, match=match):
                engine.submit(Request(bad, 3))
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit(Request([1], 0))
        gate, blocked = threading.Event(), threading.Event()

        def stall(generated):   # holds the engine's thread inside a step until the gate opens
            blocked.set()
            gate.wait()
            return None
        hold = engine.submit(Request([1], 10_000, GREEDY, mask=stall))
        assert blocked.wait(10)
        waiting = [engine.submit(Request([2], 2, GREEDY)) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(Request([3], 2, GREEDY))
        hold.cancel()
        gate.set()
        for h in waiting:
            assert len(h.tokens()) == 2
    finally:
        engine.close()


def test_a_resent_prompt_gets_the_same_tokens_on_a_quantized_model(smollm2_path):
    """Quantized prompt passes do not depend on their chunking, a decode step's arithmetic differs
    in the last bits: the cache must feed a re-sent prompt's end as a chunk, never as one token."""
    from pyllm.data import read_default_corpus
    from pyllm.llm import LLM

    llm = LLM.load(smollm2_path)
    prompt = llm.tokenizer.encode(read_default_corpus(20_000), disallowed_special=())[400:704]   # 256 + 48
    alone = _alone(llm.model, prompt, 32, temperature=0)
    for prefix_rows in (2, 0):
        engine = Engine(llm.model, EngineConfig(max_batch=2, prefix_rows=prefix_rows, context=512))
        try:
            first = engine.submit(Request(prompt, 32, GREEDY)).tokens()
            again = engine.submit(Request(prompt, 32, GREEDY))
            assert first == again.tokens() == alone
            assert again.cached_tokens == (len(prompt) - 2 if prefix_rows else 0)
        finally:
            engine.close()
