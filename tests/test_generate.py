"""Sampling (C++ against its numpy twin and against the probabilities it claims) and generation
with the KV cache (against recomputing everything at every step)."""

import math

import numpy as np
import pytest

from pyllm import kernels as K
from pyllm import reference as R
from pyllm.generate import SamplingConfig, generate
from pyllm.model import Model, ModelConfig

SETTINGS = [
    dict(),
    dict(temperature=0.0),
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.8),
    dict(top_p=0.3, temperature=1.5),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.9, min_p=0.05, temperature=0.8),
    dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
@pytest.mark.parametrize("V", [1, 3, 17, 1000])
def test_sampler_equals_its_numpy_twin(settings, V):
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    logits[1, : V // 2] = -np.inf   # masked tokens
    logits[2] *= 1000.0              # large magnitudes
    history = [rng.integers(0, V, 5), [], rng.integers(0, V, 1), rng.integers(0, V, 9)]
    for step in range(5):
        ours, p_ours = K.sample(logits, history=history, seed=[1, 2, 3, 4], step=step, return_probs=True, **settings)
        theirs, p_theirs = R.sample(logits, history=history, seed=[1, 2, 3, 4], step=step, return_probs=True,
                                    **settings)
        assert list(ours) == list(theirs)
        np.testing.assert_allclose(p_ours, p_theirs, rtol=1e-5, atol=1e-7)
        assert np.allclose(p_ours.sum(axis=1), 1.0, atol=1e-5)
        assert all(p_ours[b, t] > 0 for b, t in enumerate(ours))   # only possible tokens are drawn
    assert K.sample(logits[0], **settings) == R.sample(logits[0], **settings)


def test_rows_at_different_steps_draw_what_each_draws_alone():
    # A continuous batch samples rows that are at different steps of their own sequences.
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    seeds, steps = [5, 6, 7], [0, 11, 4]
    together = K.sample(logits, temperature=0.9, top_k=20, seed=seeds, step=steps)
    for b in range(3):
        assert together[b] == K.sample(logits[b], temperature=0.9, top_k=20, seed=seeds[b], step=steps[b])
    assert list(together) == list(R.sample(logits, temperature=0.9, top_k=20, seed=seeds, step=steps))
    for bad in ([1, 2], [-1, 0, 0], 1.5, [[1, 2, 3]]):
        with pytest.raises(ValueError, match="step"):
            K.sample(logits, seed=seeds, step=bad)


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k_ties_go_to_the_smaller_id_as_in_the_twin(top_k):
    """Equal logits at the top-k boundary, and logits that become equal only once scaled by the
    temperature (0 and 1e-30 are both 1 below the largest, 1): the smaller ids are kept."""
    cases = [np.array([0.0, 1e-30, 1.0], np.float32), np.array([2, 5, 5, 1, 5, 2, 5, 0], np.float32),
             np.round(np.random.default_rng(top_k).standard_normal(500) * 2).astype(np.float32)]
    for logits in cases:
        for step in range(20):
            for settings in (dict(temperature=1.0, top_k=top_k), dict(temperature=0.7, top_k=top_k, top_p=0.8)):
                ours, p_ours = K.sample(logits, seed=3, step=step, return_probs=True, **settings)
                theirs, p_theirs = R.sample(logits, seed=3, step=step, return_probs=True, **settings)
                assert ours == theirs
                np.testing.assert_allclose(p_ours, p_theirs, rtol=1e-6, atol=1e-9)


def test_uniform_numbers_agree():
    from pyllm import _C

    for seed, step in [(0, 0), (1, 0), (2 ** 64 - 1, 7), (12345, 10 ** 9)]:
        assert _C.sample_uniform(seed, step) == R.sample_uniform(seed, step)


def _chi_square_threshold(dof: int) -> float:
    """About the 1 - 1e-6 quantile of chi-square(dof) (Wilson-Hilferty), so a correct sampler
    fails once in a million runs."""
    z = 4.75
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=4), dict(top_p=0.75), dict(min_p=0.15),
                                      dict(temperature=1.3, top_k=6, top_p=0.9)])
def test_sample_frequencies_match_the_filtered_softmax(settings):
    logits = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, -2.5, 0.9, 1.1], np.float32)
    n = 20000
    seeds = np.arange(n, dtype=np.uint64)
    draws = K.sample(np.broadcast_to(logits, (n, logits.size)), seed=seeds, step=3, **settings)
    _, probs = K.sample(logits, return_probs=True, **settings)
    # The expected distribution from first principles, not from the kernel.
    z = logits.astype(np.float64) / settings.get("temperature", 1.0)
    p = np.exp(z - z.max())
    if "top_k" in settings:
        p[np.argsort(-z)[settings["top_k"]:]] = 0
    p /= p.sum()
    if "top_p" in settings:
        order = np.argsort(-p)
        cut = np.searchsorted(np.cumsum(p[order]), settings["top_p"]) + 1
        p[order[cut:]] = 0
    if "min_p" in settings:
        p[p < settings["min_p"] * p.max()] = 0
    p /= p.sum()
    np.testing.assert_allclose(probs, p, rtol=1e-5, atol=1e-7)
    counts = np.bincount(draws, minlength=logits.size)
    assert counts[p == 0].sum() == 0, "a filtered-out token was drawn"
    expected = n * p[p > 0]
    chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
    assert chi2 < _chi_square_threshold(int((p > 0).sum()) - 1), chi2


def test_greedy_and_penalties_behave():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    assert K.sample(logits, temperature=0) == 1
    assert K.sample(logits, temperature=0, history=[1], repetition_penalty=2.0) == 2     # 3/2 < 2
    assert K.sample(logits, temperature=0, history=[1, 1], frequency_penalty=0.6) == 2    # 3-1.2 < 2
    assert K.sample(logits, temperature=0, history=[1], presence_penalty=0.5) == 1        # 2.5 > 2
    assert K.sample(np.full(4, -np.inf, np.float32)) in range(4)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(min_p=1.0), "min_p"), (dict(repetition_penalty=0.0), "repetition"),
    (dict(history=[7]), "history"), (dict(seed=[1, 2]), "seed"),
])
def test_sampler_refuses_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        K.sample(np.zeros(4, np.float32), **bad)
    with pytest.raises(ValueError, match="NaN"):
        K.sample(np.array([0.0, np.nan], np.float32))


def test_attention_with_ragged_kv_lengths_equals_the_twin():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 4, 2, 16)).astype(np.float32)
    k = rng.standard_normal((3, 2, 70, 16)).astype(np.float32)
    v = rng.standard_normal((3, 2, 70, 16)).astype(np.float32)
    lengths = np.array([2, 70, 33])
    ours, lse = K.attention_forward(q, k, v, kv_lengths=lengths)
    theirs, lse_t = R.attention_forward(q, k, v, kv_lengths=lengths)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, lse_t, rtol=1e-5, atol=1e-5)
    k[0, :, 2:] = 1e6   # keys past a row's length take no part
    np.testing.assert_array_equal(K.attention_forward(q, k, v, kv_lengths=lengths)[0][0], ours[0])
    with pytest.raises(ValueError, match="kv_lengths"):
        K.attention_forward(q, k, v, kv_lengths=[1, 2, 3])


@pytest.fixture(scope="module")
def model():
    m = Model(ModelConfig(vocab_size=61, block_size=40, n_layer=2, n_head=4, n_embd=32), seed=0)
    rng = np.random.default_rng(1)
    m.params[...] += rng.standard_normal(m.params.size).astype(np.float32) * 0.05   # a less uniform model
    return m


def test_forward_step_logits_equal_the_full_forward(model):
    from pyllm.model import KVCache

    ids = np.random.default_rng(0).integers(0, 61, (2, 12))
    cache = KVCache(model.config, 2, 20)
    first = model.forward_step(ids[:, :7], cache)
    np.testing.assert_allclose(first, model(ids[:, :7])[:, -1], rtol=1e-4, atol=1e-5)
    for t in range(7, 12):
        step = model.forward_step(ids[:, t:t + 1], cache)
        np.testing.assert_allclose(step, model(ids[:, :t + 1])[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prompt", [[5], [1, 2, 3, 4, 5, 6, 7], list(range(30))])
def test_cached_greedy_generation_equals_recomputing_every_step(model, prompt):
    cached = model.generate(prompt, 9, temperature=0)
    plain = generate(model, prompt, 9, temperature=0, use_cache=False)
    assert cached.tolist() == plain.tolist()
    assert cached[:len(prompt)].tolist() == prompt and len(cached) == min(len(prompt) + 9, 40)


def test_a_ragged_batch_equals_each_prompt_alone(model):
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]
    batch = model.generate(prompts, 8, temperature=0)
    for prompt, out in zip(prompts, batch):
        assert out.tolist() == model.generate(prompt, 8, temperature=0).tolist()
        assert out.tolist() == generate(model, prompt, 8, temperature=0, use_cache=False).tolist()
    sampled = model.generate(prompts, 8, temperature=1.0, top_k=10, seed=5)
    again = model.generate(prompts, 8, temperature=1.0, top_k=10, seed=5)
    uncached = generate(model, prompts, 8, temperature=1.0, top_k=10, seed=5, use_cache=False)
    assert [a.tolist() for a in sampled] == [a.tolist() for a in again] == [a.tolist() for a in uncached]
    other = model.generate(prompts, 8, temperature=1.0, top_k=10, seed=6)
    assert [a.tolist() for a in sampled] != [a.tolist() for a in other]


def test_a_float16_cache_decodes_close_to_float32_and_batches_alike(model):
    from pyllm.model import KVCache

    prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    caches = [KVCache(model.config, 1, 20, dtype) for dtype in (np.float32, np.float16)]
    assert caches[1].k_all.dtype == np.float16 and caches[1].k_all.nbytes * 2 == caches[0].k_all.nbytes
    steps = [[model.forward_step(prompt, c)] for c in caches]
    for t in range(6):
        for c, out in zip(caches, steps):
            out.append(model.forward_step(np.array([[t + 7]]), c))
    for full, half in zip(*steps):
        scale = np.abs(full).max()
        assert np.abs(half - full).max() <= 1e-2 * scale
        assert not np.array_equal(half, full)          # the values were rounded
    default = model.kv_dtype
    try:
        model.kv_dtype = np.float16
        prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]
        batch = model.generate(prompts, 8, temperature=0)
        for p, out in zip(prompts, batch):
            assert out.tolist() == model.generate(p, 8, temperature=0).tolist()
    finally:
        model.kv_dtype = default
    with pytest.raises(ValueError, match="float32 or float16"):
        KVCache(model.config, 1, 4, np.int8)


def test_a_step_on_any_rows_of_the_cache_equals_each_row_alone(model):
    # A continuous batch: rows 2 and 0 of a 4-row cache step together, in that order, while rows 1
    # and 3 keep what they hold.
    from pyllm.model import KVCache

    cache = KVCache(model.config, 4, 30)
    prompts = {0: [3, 1, 4, 1, 5], 1: [9, 2], 2: [2, 6, 5, 3, 5, 8, 9], 3: [7]}
    for r, p in prompts.items():
        model.forward_step(np.array([p]), cache, rows=[r])
    untouched = cache.k_all[:, [1, 3]].copy()
    logits = model.forward_step(np.array([[11], [12]]), cache, rows=np.array([2, 0]))
    assert cache.lengths.tolist() == [6, 2, 8, 1]
    assert np.array_equal(cache.k_all[:, [1, 3]], untouched)
    for b, r in enumerate((2, 0)):
        alone = KVCache(model.config, 1, 30)
        model.forward_step(np.array([prompts[r]]), alone)
        assert np.array_equal(model.forward_step(np.array([[11 + b]]), alone), logits[b:b + 1])
    for bad in ([0, 0], [4], [], [[0]]):
        with pytest.raises(ValueError, match="rows"):
            model.forward_step(np.ones((max(len(np.ravel(bad)), 1), 1), np.int64), cache, rows=bad)


def test_stop_tokens_end_a_sequence(model):
    free = model.generate([1, 2, 3], 10, temperature=0)
    stop = int(free[5])
    stopped = model.generate([1, 2, 3], 10, temperature=0, stop_tokens=[stop])
    assert stopped.tolist() == free[: free.tolist().index(stop, 3) + 1].tolist()


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate([], 3), "empty"),
    (lambda m: m.generate([61], 3), "outside"),
    (lambda m: m.generate(list(range(40)), 3), "context window"),
    (lambda m: m.generate([1], 3, top_p=0.0), "top_p"),
    (lambda m: m.generate([1], 3, temperature=-0.5), "temperature"),
    (lambda m: m.generate([1], -1), "max_new_tokens"),
])
def test_generation_refuses_bad_input(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)


def test_sampling_config_validates_on_construction():
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-3)


def test_sampler_refuses_non_finite_penalties_and_survives_tiny_temperatures():
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    for bad in (dict(presence_penalty=float("nan")), dict(frequency_penalty=-float("inf")),
                dict(repetition_penalty=float("inf"))):
        with pytest.raises(ValueError, match="penalty"):
            K.sample(logits, history=[1], **bad)
    token, probs = K.sample(logits, temperature=1e-310, return_probs=True)
    assert token == 1 and np.isfinite(probs).all() and probs[1] == 1.0
    assert R.sample(logits, temperature=1e-310) == 1


def test_cached_and_uncached_generation_stop_alike_at_the_context_edge():
    m = Model(ModelConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=0)
    for prompt in ([1, 2, 3, 4, 5], [1] * 7):
        cached = m.generate(prompt, 10, temperature=0)
        assert cached.tolist() == generate(m, prompt, 10, temperature=0, use_cache=False).tolist()
        assert len(cached) == 8


def test_forward_step_checks_its_ids(model):
    from pyllm.model import KVCache

    cache = KVCache(model.config, 1, 10)
    for bad in (np.array([[61]]), np.array([[-1]]), np.zeros((1, 0), np.int64), np.zeros((2, 1), np.int64)):
        with pytest.raises(ValueError, match="ids"):
            model.forward_step(bad, cache)


def test_two_threads_generating_on_one_model_get_what_each_gets_alone(model):
    import threading

    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]
    alone = [model.generate(p, 12, temperature=0.9, top_k=20, seed=i).tolist() for i, p in enumerate(prompts)]
    results = [None, None]

    def run(i):
        for _ in range(5):
            results[i] = model.generate(prompts[i], 12, temperature=0.9, top_k=20, seed=i).tolist()

    for _ in range(20):   # shared buffers corrupt about one round in five: twenty rounds catch it
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone

