"""Seeing inside (pyllm.explain, LLM.explain, `pyllm explain`, pyllm.report): the numbers against
their definitions and against transformers' own attention weights and hidden states, the trace
against the sampler, and the HTML page rendered in headless Chromium."""

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

from conftest import chromium, hf_twin, quick_train
from pyllm import kernels, reference, report
from pyllm.explain import MAX_TOKENS, explain, filter_stages
from pyllm.generate import SamplingConfig
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer

OUTSIDE = tempfile.gettempdir()
TEXT = "Dogs are loyal animals. Cats are curious animals. Birds are small animals that sing. "
CONFIGS = {
    "llama": dict(arch="llama", n_kv_head=2),
    "gpt2": dict(arch="gpt2"),
    "qwen3": dict(arch="qwen3", n_kv_head=1, head_dim=12),
    "gemma3": dict(arch="gemma3", n_kv_head=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   final_logit_softcapping=5.0),
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 20], 300, special_tokens=["<|endoftext|>"], progress=False)


@pytest.fixture(scope="module")
def tiny(tok):
    """A small Llama trained a few seconds on the sentences, so its distributions are not flat."""
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4,
                              n_kv_head=2, n_embd=48, intermediate_size=96), seed=0)
    quick_train(model, tok.encode(TEXT * 30), 80, 32)
    return LLM(model, tok)


def _model(tok, name: str) -> Model:
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=48,
                      intermediate_size=80, **CONFIGS[name])
    return Model(cfg, seed=3)


# ----------------------------------------------------------------------------- the numbers

def test_probs_are_the_softmax_of_the_last_logits_and_top_is_their_order(tiny):
    e = tiny.explain("Dogs are", top_k=7)
    ids = tiny.encode_prompt("Dogs are")
    logits = tiny.model(ids)[0, -1]
    expected = reference.softmax(logits[None])[0]
    np.testing.assert_allclose(e.probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.model_probs, expected, rtol=1e-5, atol=1e-7)
    assert e.probs.shape == (tiny.model.config.vocab_size,) and abs(e.probs.sum() - 1) < 1e-5
    assert [t for t, _, _ in e.top] == list(np.argsort(-expected, kind="stable")[:7])
    assert all(piece == tiny.tokenizer.decode([t]) for t, piece, _ in e.top)
    assert [p for *_, p in e.top] == sorted((p for *_, p in e.top), reverse=True)
    assert e.tokens == [(t, tiny.tokenizer.decode([t])) for t in ids]


def test_surprisal_is_minus_log2_of_each_token_given_the_ones_before(tiny):
    text = "Cats are curious animals."
    e = tiny.explain(text)
    ids = tiny.encode_prompt(text)
    probs = reference.softmax(tiny.model(ids)[0])
    assert np.isnan(e.surprisal[0])
    np.testing.assert_allclose(e.surprisal[1:], -np.log2(probs[np.arange(len(ids) - 1), ids[1:]]), rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_equals_transformers_and_rows_are_causal_distributions(tok, name):
    """Each layer's (n_head, T, T) weights: rows sum to 1, 0 above the diagonal (and before a sliding
    window), equal to transformers' output_attentions on the same weights."""
    torch = pytest.importorskip("torch")
    model = _model(tok, name)
    ids = np.array(tok.encode(TEXT[:60]))
    seen = model.inspect(ids)
    theirs = hf_twin(model)
    with torch.no_grad():
        out = theirs(torch.from_numpy(ids[None]), output_attentions=True, output_hidden_states=True)
    T = ids.size
    assert len(seen.attention) == model.config.n_layer
    for i, (mine, hf) in enumerate(zip(seen.attention, out.attentions)):
        assert mine.shape == (model.config.n_head, T, T)
        np.testing.assert_allclose(mine.sum(-1), 1.0, atol=3e-5)
        assert (mine[:, np.triu(np.ones((T, T), bool), 1)] == 0).all()
        window = model.config.layer_window(i)
        if window:
            assert (mine[:, np.tril(np.ones((T, T), bool), -window)] == 0).all()
        np.testing.assert_allclose(mine, hf[0].numpy(), atol=2e-5, err_msg=f"{name} layer {i}")


def test_attention_equals_the_numpy_twins_weights_on_the_layers_q_and_k(tok):
    """The kernel's weights against reference.attention_forward on the q and k the layer computed
    (kept in the training workspace: rotated, scaled)."""
    model = _model(tok, "llama")
    ids = np.array(tok.encode(TEXT[:50]))
    seen = model.inspect(ids)
    cfg, T = model.config, ids.size
    for i in range(cfg.n_layer):
        qkv = model._buffers.train.get(f"qkv.{i}", (T, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_size))
        heads = qkv.reshape(1, T, -1, cfg.head_size).transpose(0, 2, 1, 3)
        q, k = heads[:, :cfg.n_head], heads[:, cfg.n_head:cfg.n_head + cfg.n_kv_head]
        _, _, probs = reference.attention_forward(q, k, k, True, return_probs=True)
        np.testing.assert_allclose(seen.attention[i], probs[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_logit_lens_reads_each_layer_through_the_final_norm_and_head(tok, name):
    """The last layer's lens is the output; the others equal transformers' hidden states after
    each layer taken through its final norm and head."""
    torch = pytest.importorskip("torch")
    model = _model(tok, name)
    ids = np.array(tok.encode(TEXT[:40]))
    seen = model.inspect(ids)
    np.testing.assert_array_equal(model.lens_logits(seen.residuals[-1]), seen.logits)
    np.testing.assert_allclose(seen.logits, model(ids)[0], rtol=1e-5, atol=1e-5)
    theirs = hf_twin(model)
    final_norm = theirs.transformer.ln_f if name == "gpt2" else theirs.model.norm
    with torch.no_grad():
        out = theirs(torch.from_numpy(ids[None]), output_hidden_states=True)
        for i in range(model.config.n_layer - 1):   # the last hidden state transformers returns is normed
            hidden = out.hidden_states[i + 1]
            expected = theirs.lm_head(final_norm(hidden))[0].numpy()
            if model.config.final_logit_softcapping:
                cap = model.config.final_logit_softcapping
                expected = np.tanh(expected / cap) * cap
            np.testing.assert_allclose(seen.residuals[i], hidden[0].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(model.lens_logits(seen.residuals[i]), expected, rtol=1e-4, atol=1e-4)


def test_explanation_lens_ends_with_the_models_own_guess(tiny):
    e = tiny.explain("Birds are", lens_k=4)
    assert len(e.lens) == tiny.model.config.n_layer
    assert [t for t, _, _ in e.lens[-1]] == [t for t, _, _ in e.top[:4]]
    np.testing.assert_allclose([p for *_, p in e.lens[-1]], [p for *_, p in e.top[:4]], rtol=1e-5)
    assert len(e.lens_grid) == tiny.model.config.n_layer and len(e.lens_grid[0]) == len(e.lens_positions)
    assert e.lens_grid[-1][-1][0] == e.top[0][0]


@pytest.mark.parametrize("options", [dict(temperature=0.7, sample_top_k=5), dict(temperature=1.3, top_p=0.8),
                                     dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
                                     dict(temperature=0.0)], ids=["top-k", "top-p", "min-p+penalty", "greedy"])
def test_the_trace_is_the_samplers_distribution_and_generation_itself(tiny, options):
    prompt = "Dogs are"
    e = tiny.explain(prompt, generate=6, seed=5, **options)
    ids = tiny.encode_prompt(prompt)
    sampling = SamplingConfig(options.get("temperature", 1.0), options.get("sample_top_k"), options.get("top_p"),
                              options.get("min_p"), options.get("repetition_penalty", 1.0))
    generated = tiny.model.generate(ids, 6, sampling.temperature, sampling.top_k, sampling.top_p, seed=5,
                                    min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty,
                                    stop_tokens=tiny.stop_token_ids)
    assert [s.token for s in e.trace] == list(generated[len(ids):])
    assert e.generated == tiny.tokenizer.decode(list(generated[len(ids):]))
    history = list(ids)
    for s in e.trace:
        logits = tiny.model(np.array(history))[0, -1]
        model_probs = reference.softmax(logits[None])[0]
        twin = reference.sample(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                min_p=sampling.min_p, repetition_penalty=sampling.repetition_penalty,
                                history=history, return_probs=True)[1]
        np.testing.assert_allclose(s.probs, twin, atol=2e-5)
        assert s.prob == pytest.approx(float(s.probs[s.token])) and s.kept == int((s.probs > 0).sum())
        assert s.model_prob == pytest.approx(float(model_probs[s.token]), rel=1e-4)
        assert s.rank == 1 + int((model_probs > model_probs[s.token] + 1e-7).sum())
        names = [name for name, _, _ in s.removed]
        removed = sum(count for _, count, _ in s.removed)
        assert removed == tiny.model.config.vocab_size - s.kept     # every token the draw could not pick, once
        if options.get("temperature") == 0:
            assert s.kept == 1 and s.rank == 1 and names == ["greedy"]
        if "sample_top_k" in options:
            assert names == ["temperature", "top-k"] and s.kept <= 5
        if "repetition_penalty" in options:
            assert names[0] == "penalties"
        history.append(s.token)
    # The first step's numbers are the explanation's table.
    np.testing.assert_allclose(e.trace[0].probs, e.probs, atol=1e-6)


def test_filter_stages_follow_the_samplers_order(tiny):
    logits = np.linspace(-3, 3, 40).astype(np.float32)
    stages = filter_stages(logits, SamplingConfig(0.5, 10, 0.6, 0.2), [])
    assert [name for name, _ in stages] == ["temperature", "top-k", "top-p", "min-p"]
    last = kernels.sample(logits, temperature=0.5, top_k=10, top_p=0.6, min_p=0.2, return_probs=True)[1]
    np.testing.assert_array_equal(stages[-1][1], last)
    kept = [int((p > 0).sum()) for _, p in stages]
    assert kept == sorted(kept, reverse=True) and kept[0] == 40 and kept[1] == 10


def test_explain_refuses_what_it_cannot_show(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.explain("")
    with pytest.raises(ValueError, match=f"at most {MAX_TOKENS} tokens"):
        explain(tiny.model, tiny.tokenizer, [1] * 10, generate=MAX_TOKENS)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        tiny.explain("Dogs", top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        tiny.explain("Dogs", temperature=-1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        tiny.explain(["Dogs"])
    with pytest.raises(ValueError, match="one sequence"):
        tiny.model.inspect(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="residual must be"):
        tiny.model.lens_logits(np.zeros((2, 5), np.float32))


def test_the_terminal_table(tiny):
    e = tiny.explain("Dogs are", top_k=3, generate=3, temperature=0)
    text = e.table()
    assert "prompt: 'Dogs are'" in text and "next token:" in text and "\u2588" in text
    assert f"{e.top[0][1]!r}" in text and "logit lens" in text and "layer  1:" in text
    assert "generation (greedy):" in text and text.count(" rank ") == 3
    assert str(e) == text


# ----------------------------------------------------------------------------- the page

def _png_pixels(data: bytes) -> np.ndarray:
    """report.png's output decoded (8-bit RGB, filter 0 rows), to check the encoder by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    W, H, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(H, 1 + 3 * W)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(H, W, 3)


def test_png_encodes_the_pixels_it_is_given():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_png_pixels(report.png(image)), image)
    with pytest.raises(ValueError, match="png needs"):
        report.png(np.zeros((0, 3, 3), np.uint8))


def test_the_html_page_renders_offline_in_chromium(tiny, tmp_path):
    """The report opened from a file in headless Chromium: every prompt token, the table, one heatmap
    per layer and head (T x T pixels, masked cells grey, the first key's weight coloured), the lens
    and the trace; nothing fetched from anywhere; no console error."""
    from selenium.webdriver.common.by import By
    e = tiny.explain("Dogs are loyal", top_k=5, generate=4, temperature=0.8, seed=1)
    path = e.to_html(tmp_path / "explain.html")
    page = path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page
    browser = chromium()
    try:
        browser.get(path.as_uri())
        T, cfg = len(e.tokens), tiny.model.config
        strip = browser.find_elements(By.CSS_SELECTOR, ".strip .tok")
        assert [el.text.split("\n")[0] for el in strip] == [report.visible(p) for _, p in e.tokens]
        assert [el.text.split("\n")[1] for el in strip] == [str(t) for t, _ in e.tokens]
        tables = browser.find_elements(By.TAG_NAME, "table")
        assert len(tables) == 3   # probabilities, logit lens, trace
        assert len(tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")) == 5
        trace_rows = tables[2].find_elements(By.CSS_SELECTOR, "tbody tr")
        assert len(trace_rows) == len(e.trace)
        for row, step in zip(trace_rows, e.trace):
            cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
            assert cells[1] == report.visible(step.piece) and cells[2] == f"{step.prob:.4f}"
            _, text, model_p, _ = step.alternatives[0]
            assert cells[7].startswith(f"{report.visible(text)} {model_p:.3f}"), cells[7]   # escaped once
        thumbs = browser.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert len(thumbs) == cfg.n_layer * cfg.n_head
        sizes = browser.execute_script("return [...document.querySelectorAll('img.thumb')].map(i => [i.complete, "
                                       "i.naturalWidth, i.naturalHeight])")
        assert all(s == [True, T, T] for s in sizes), sizes[:3]
        # Pixels of the first map read back through a canvas: above the diagonal grey, the rest coloured.
        pixels = browser.execute_script("""
            const img = document.querySelector('img.thumb'), c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            return Array.from(g.getImageData(0, 0, c.width, c.height).data);""")
        rgba = np.array(pixels, np.uint8).reshape(T, T, 4)[..., :3]
        expected = report.ramp(np.where(np.triu(np.ones((T, T), bool), 1), np.nan, e.attention[0][0]))
        np.testing.assert_allclose(rgba.astype(int), expected.astype(int), atol=2)
        thumbs[1].click()
        assert "open" in browser.find_element(By.ID, "zoom").get_attribute("class")
        assert browser.find_element(By.ID, "zoom-title").text == "layer 0 head 1"
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
        assert all(name.startswith("data:") for name in resources), resources
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
        screenshot = _png_pixels_any(browser.get_screenshot_as_png())
        assert screenshot.std() > 10   # not a blank page
    finally:
        browser.quit()


def _png_pixels_any(data: bytes) -> np.ndarray:
    """Chromium's screenshot (8-bit RGB or RGBA, any filters) decoded to (H, W, channels)."""
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IHDR":
            header = struct.unpack(">IIBB", data[pos + 8:pos + 18])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    W, H, depth, colour = header
    assert depth == 8 and colour in (2, 6)
    c = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(H, 1 + c * W)
    out = np.zeros((H, c * W), np.int32)
    for y in range(H):   # undo the PNG row filters (none, sub, up, average, Paeth)
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        prev = out[y - 1] if y else np.zeros(c * W, np.int32)
        if f == 0:
            out[y] = line
        elif f == 2:
            out[y] = (line + prev) % 256
        else:
            row = np.zeros(c * W, np.int32)
            for x in range(c * W):
                a = row[x - c] if x >= c else 0
                b, d = prev[x], prev[x - c] if x >= c else 0
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - d
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - d)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else d)
                row[x] = (line[x] + pred) % 256
            out[y] = row
    return out.reshape(H, W, c)[..., :3]


# ----------------------------------------------------------------------------- CLI and reports

def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyllm", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=OUTSIDE, env={**os.environ, "PYLLM_NUM_THREADS": "1"})


def test_pyllm_explain_prints_the_table_and_writes_the_page(tiny, tmp_path):
    tiny.save(tmp_path / "model")
    page = tmp_path / "dogs.html"
    proc = _run("explain", "--model", str(tmp_path / "model"), "Dogs are", "--generate", "3", "--temperature", "0.7",
                "--top-k", "20", "--seed", "2", "--show", "4", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert "next token:" in proc.stdout and "logit lens" in proc.stdout and "generation (temperature 0.7, top-k 20)" \
        in proc.stdout
    assert f"wrote {page}" in proc.stdout
    text = page.read_text(encoding="utf-8")
    assert text.count('class="thumb"') == tiny.model.config.n_layer * tiny.model.config.n_head
    e = tiny.explain("Dogs are", 4, 0.7, generate=3, sample_top_k=20, seed=2)
    assert "prompt: 'Dogs are' (2 tokens, model)" in proc.stdout   # the folder's name
    assert e.table().split("\n", 1)[1] in proc.stdout               # the same numbers as the library's


def test_pyllm_tokenize_encode_writes_the_token_strip(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    page = tmp_path / "tokens.html"
    proc = _run("tokenize", "encode", "--tokenizer", str(tmp_path / "tok.json"), "Dogs are loyal.", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text(encoding="utf-8")
    ids = tok.encode("Dogs are loyal.")
    assert text.count('class="tok"') == len(ids)
    assert all("<small" in text and f">{i}</small>" in text for i in ids)


def test_training_writes_a_report_of_its_curves(tmp_path):
    from pyllm.train import TrainConfig, train
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 200, encoding="utf-8")
    cfg = TrainConfig(data=[str(data)], out_dir=str(tmp_path / "run"), vocab_size=300, arch="llama", n_layer=1,
                      n_head=2, n_embd=32, block_size=32, batch_size=4, max_steps=12, eval_interval=4,
                      eval_batches=2, progress=False)
    train(cfg)
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert page.count("<svg") == 4 and "validation loss" in page and "learning rate" in page
    assert "gradient norm" in page and "tokens/s" in page and "https://" not in page
    first_chart = page[page.index("<svg"):page.index("</svg>")]
    polylines = first_chart.count("<polyline")
    assert polylines == 2   # train and validation
    train_points = first_chart.split("<polyline")[1].split('points="')[1].split('"')[0].split()
    assert len(train_points) == len(records) == 12
    browser = chromium()
    try:   # drawn by a browser: four charts with their lines, nothing fetched, no console error
        browser.get((tmp_path / "run" / "report.html").as_uri())
        sizes = browser.execute_script("return [...document.querySelectorAll('svg polyline')].map("
                                       "p => p.getBBox().width)")
        assert len(sizes) == 5 and all(w > 100 for w in sizes), sizes
        assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    finally:
        browser.quit()


def test_finetuning_writes_a_report_with_learning_rate_and_gradient_norm(tiny, tmp_path):
    from pyllm import finetune
    examples = [{"messages": [{"role": "user", "content": "Dogs?"}, {"role": "assistant", "content": "loyal"}]}] * 8
    data = tmp_path / "sft.jsonl"
    finetune.write_jsonl(data, examples)
    llm = LLM(Model(tiny.model.config, seed=1), tiny.tokenizer)
    items = finetune.read_examples(data, llm)
    cfg = finetune.SFTConfig(epochs=1, batch_size=2, lr=1e-3)
    records = finetune.sft(llm, items, items[:2], cfg, out_dir=tmp_path / "tuned", progress=False)
    assert all({"lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records)
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in records)
    page = (tmp_path / "tuned" / finetune.REPORT).read_text(encoding="utf-8")
    assert page.count("<svg") == 4 and "validation loss" in page
