"""What a new user trips over, each checked: honest resume, DPO defaults that learn, the context
window, tiktoken export, CLI habits (--version, bare pyllm, --stop, quiet logs), file modes,
perplexity against transformers, TOML configs."""

import json
import os
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_twin, quick_train
from pyllm import Tokenizer, __version__
from pyllm.evaluate import perplexity, windows_of
from pyllm.llm import LLM, ContextWindowFull
from pyllm.model import Model, ModelConfig
from pyllm.optim import cosine_lr
from pyllm.train import TrainConfig, train

OUTSIDE = tempfile.gettempdir()
TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(2000))


def pyllm(*args, timeout=300, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "pyllm", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=OUTSIDE, input=input, env={**os.environ, "PYLLM_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _small(corpus, out, **kw) -> TrainConfig:
    base = dict(data=[str(corpus)], out_dir=str(out), vocab_size=300, arch="llama", n_layer=1, n_head=2, n_embd=32,
                block_size=32, batch_size=4, eval_interval=10, eval_batches=2, warmup_steps=3, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train([TEXT], 320, special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2,
                              n_embd=32, intermediate_size=64), seed=0)
    quick_train(model, tok.encode(TEXT[:20000]), 200, 32, lr=1e-2)
    return LLM(model, tok)


# ----------------------------------------------------------------------------- resume

def test_a_changed_max_steps_on_resume_is_refused_with_the_rates_it_would_jump_between(corpus, tmp_path):
    out = tmp_path / "run"
    train(_small(corpus, out, max_steps=20, checkpoint_interval=10))
    with pytest.raises(ValueError, match=r"schedule ends at step 20; --max-steps 40 would redraw it.*"
                                         r"--extend-schedule"):
        train(_small(corpus, out, max_steps=40, resume=True))


def test_an_extended_schedule_goes_on_from_the_rate_it_had(corpus, tmp_path):
    out = tmp_path / "run"
    first = train(_small(corpus, out, max_steps=20, lr=1e-3, min_lr=1e-4)).history
    more = train(_small(corpus, out, max_steps=40, lr=1e-3, min_lr=1e-4, resume=True, extend_schedule=True)).history
    assert [r["step"] for r in more] == list(range(21, 41))
    rate_at_20 = cosine_lr(20, 1e-3, 3, 20, 1e-4)   # where the first schedule was (its end: min_lr)
    assert more[0]["lr"] == pytest.approx(rate_at_20)
    rates = [r["lr"] for r in first + more]
    assert all(b <= a + 1e-12 for a, b in zip(rates[3:], rates[4:]))   # decays, never jumps back up
    assert more[0]["time_s"] >= first[-1]["time_s"] and more[-1]["time_s"] > first[-1]["time_s"]   # the clock goes on
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 40 and saved["schedule_restart"] == [20, pytest.approx(rate_at_20)]


def test_time_planned_runs_evaluate_more_than_once(corpus, tmp_path):
    history = train(_small(corpus, tmp_path / "t", max_minutes=0.05, max_steps=10 ** 6, eval_interval=100000)).history
    assert sum("val_loss" in r for r in history) >= 3, len(history)


# ----------------------------------------------------------------------------- DPO

def test_dpo_defaults_move_the_margin_and_the_summary_names_its_measures(tmp_path, tiny):
    tiny.save(tmp_path / "base")
    proc = pyllm("finetune", "dpo", "--model", tmp_path / "base", "--data", tmp_path / "pairs.jsonl", "--example", "40",
                 "--lora-rank", "16", "--epochs", "3", "--out", tmp_path / "dpo", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "dpo" / "finetune_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    # The old default (5e-6, 10 warm-up steps of 15) ended at loss 0.69312, margin 6e-05.
    assert log[-1]["loss"] < 0.6926 and log[-1]["reward_margin"] > 0.001, log[-1]   # 20x the old default
    assert "reward accuracy" in proc.stdout and "held-out preference accuracy after" in proc.stdout
    assert "finds likelier" in proc.stdout


# ----------------------------------------------------------------------------- generation

def test_the_context_window_is_announced_or_shifted(tiny):
    prompt = "def function_1(x):\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = tiny.generate(prompt, 200, temperature=0)
    assert [w.category for w in caught] == [ContextWindowFull]
    assert "context window" in str(caught[0].message) and "context_shift=True" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # shifting: no warning, and it goes on past the window
        pieces = list(tiny.generate(prompt, 200, temperature=0, context_shift=True, stream=True))
        longer = "".join(pieces)
    assert len(longer) > len(text) and longer.startswith(text)


def test_chat_says_when_a_reply_fills_the_window_and_shifts_on_request(tiny, tmp_path):
    tiny.save(tmp_path / "m")
    flags = ["chat", "--model", tmp_path / "m", "--max-new-tokens", "300", "--temperature", "0",
             "--repetition-penalty", "1"]
    stopped = pyllm(*flags, input="def function_1(x):\n")
    shifted = pyllm(*flags, "--context-shift", input="def function_1(x):\n")
    assert stopped.returncode == shifted.returncode == 0, stopped.stderr + shifted.stderr
    assert "context window" in stopped.stderr and "--context-shift" in stopped.stderr
    assert "context window" not in shifted.stderr
    reply = stopped.stdout.split("assistant> ")[1].split("you> ")[0]
    longer = shifted.stdout.split("assistant> ")[1].split("you> ")[0]
    assert len(tiny.tokenizer.encode(longer)) > tiny.context_window > len(tiny.tokenizer.encode(reply))
    assert longer.startswith(reply.rstrip())


def test_generate_takes_a_list_of_prompts_and_the_cli_takes_stop(tiny, tmp_path):
    prompts = ["def function_3(x):", "def function_9(x):"]
    assert tiny.generate(prompts, 8, temperature=0) == [tiny.generate(p, 8, temperature=0) for p in prompts]
    tiny.save(tmp_path / "m")
    continuation = tiny.generate("def function_3(x):", 20, temperature=0)
    stop = "return"   # what the model writes after a def line
    assert stop
    full = pyllm("generate", "--model", tmp_path / "m", "def function_3(x):", "--max-new-tokens", "20",
                 "--temperature", "0")
    cut = pyllm("generate", "--model", tmp_path / "m", "def function_3(x):", "--max-new-tokens", "20",
                "--temperature", "0", "--stop", stop)
    assert full.returncode == cut.returncode == 0, cut.stderr
    assert continuation in full.stdout
    expected = "def function_3(x):" + continuation[:continuation.index(stop)]
    assert cut.stdout.rstrip("\n").endswith(expected) and stop not in cut.stdout.split("def function_3(x):")[-1]


# ----------------------------------------------------------------------------- tokenizer

def test_the_tiktoken_export_gives_the_same_ids(tiny):
    tiktoken = pytest.importorskip("tiktoken")
    tok = tiny.tokenizer
    assert tok.pattern == "gpt4" and tok.pattern_regex.startswith("'(?i:")
    enc = tok.to_tiktoken()
    assert isinstance(enc, tiktoken.Encoding)
    for text in (TEXT[:3000], "Ünïcødé 数字 123  \n\t x", ""):
        assert enc.encode(text) == tok.encode(text)
    assert enc.encode("a<|endoftext|>", allowed_special="all") == tok.encode("a<|endoftext|>", allowed_special="all")
    assert len(tok) == tok.vocab_size and "byte-level BPE" in repr(tok) and str(tok.vocab_size) in repr(tok)
    digits = Tokenizer(tok.vocab, tok.merges, "gpt2_digits")
    with pytest.raises(ValueError, match="not one regex"):
        digits.pattern_regex


# ----------------------------------------------------------------------------- CLI habits and files

def test_version_and_bare_pyllm():
    proc = pyllm("--version")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == f"pyllm {__version__}"
    bare = pyllm()
    assert bare.returncode == 2 and "usage: pyllm" in bare.stdout and "explain" in bare.stdout


def test_a_log_file_gets_no_progress_bar_redraws(corpus, tmp_path):
    """stderr to a file (not a terminal): no bar, no carriage returns; the run's own lines stay."""
    with open(tmp_path / "err.log", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "pyllm", "train", "--data", corpus, "--out", tmp_path / "r",
                               "--vocab-size", "300", "--arch", "llama", "--n-layer", "1", "--n-head", "2",
                               "--n-embd", "32", "--block-size", "32", "--max-steps", "5", "--sample-tokens", "0"],
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=300, cwd=OUTSIDE)
    assert proc.returncode == 0
    log = (tmp_path / "err.log").read_text()
    assert "\r" not in log and "it/s" not in log and "step/s" not in log
    assert "validation loss" in proc.stdout


def test_files_are_written_with_the_users_umask(tmp_path, tiny):
    old = os.umask(0o022)
    try:
        tiny.save(tmp_path / "m")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


def test_the_package_is_typed():
    import pyllm as package
    assert (Path(package.__file__).parent / "py.typed").is_file()


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_equals_transformers_on_the_same_windows(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    ids = np.array(tiny.tokenizer.encode(TEXT[:6000]))
    result = perplexity(tiny.model, ids, context=48, batch=3, progress=False)
    theirs = hf_twin(tiny.model)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows_of(ids, 48):
            logits = theirs(torch.from_numpy(window[None, :-1])).logits[0].double()
            total += float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(window[1:]), reduction="sum"))
            count += len(window) - 1
    assert result.tokens == count and result.windows == len(windows_of(ids, 48))
    assert result.perplexity == pytest.approx(np.exp(total / count), rel=1e-4)
    (tmp_path / "t.txt").write_text(TEXT[:6000], encoding="utf-8")
    tiny.save(tmp_path / "m")
    proc = pyllm("eval", "--model", tmp_path / "m", tmp_path / "t.txt", "--context", "48", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"perplexity {tiny.perplexity(TEXT[:6000], 48).perplexity:.4f}" in proc.stdout
    with pytest.raises(ValueError, match="context must be an integer in"):
        perplexity(tiny.model, ids, context=1000)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(tiny.model, ids[:1])


# ----------------------------------------------------------------------------- configs

def test_train_reads_a_toml_config_refuses_unknown_keys_and_saves_what_it_resolved(corpus, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'data = ["{corpus}"]\nvocab-size = 300\narch = "llama"\nn_layer = 1\nn_head = 2\n'
                      f'n_embd = 32\nblock_size = 32\nmax_steps = 4\nlr = 3e-3\n', encoding="utf-8")
    proc = pyllm("train", "--config", config, "--out", tmp_path / "r", "--max-steps", "3", "--no-progress",
                 "--sample-tokens", "0")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert resolved["lr"] == 3e-3 and resolved["n_layer"] == 1 and resolved["max_steps"] == 3   # the flag wins
    assert len((tmp_path / "r" / "log.jsonl").read_text().splitlines()) == 3
    config.write_text(config.read_text() + "learning_rate = 1\n", encoding="utf-8")
    bad = pyllm("train", "--config", config, "--out", tmp_path / "r2")
    assert bad.returncode == 2 and "unknown setting(s) learning_rate" in bad.stderr and str(config) in bad.stderr
    config.write_text("n_layer = [", encoding="utf-8")
    broken = pyllm("train", "--config", config, "--out", tmp_path / "r3")
    assert broken.returncode == 2 and "not valid TOML" in broken.stderr
    config.write_text('n_layer = "six"\n', encoding="utf-8")
    typed = pyllm("train", "--config", config, "--out", tmp_path / "r4")
    assert typed.returncode == 2 and "invalid int value: 'six'" in typed.stderr


def test_finetune_reads_a_toml_config_too(tmp_path, tiny):
    tiny.save(tmp_path / "base")
    config = tmp_path / "sft.toml"
    config.write_text(f'model = "{tmp_path / "base"}"\ndata = "{tmp_path / "sft.jsonl"}"\nexample = 16\n'
                      f'lora-rank = 4\nepochs = 1\nbatch_size = 4\nno-progress = true\nresume = false\n',
                      encoding="utf-8")
    proc = pyllm("finetune", "sft", "--config", config, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "out" / "finetune_log.jsonl").read_text().splitlines()
    assert len(log) == 4 and (tmp_path / "out" / "adapter").is_dir()   # 16 examples less the held-out, 4 a step
    resolved = json.loads((tmp_path / "out" / "finetune_config.json").read_text())
    assert resolved["lora_rank"] == 4 and resolved["batch_size"] == 4 and resolved["epochs"] == 1
    config.write_text(config.read_text() + "lora_rnk = 3\n", encoding="utf-8")
    bad = pyllm("finetune", "sft", "--config", config, "--out", tmp_path / "out2")
    assert bad.returncode == 2 and "unknown setting(s) lora_rnk" in bad.stderr and "lora-rank" in bad.stderr


def test_the_readme_s_first_chat_answers_in_a_sentence(smollm2_path):
    """The README's example, with chat's defaults (a repetition penalty, the end-of-turn stop): before
    them SmolLM2 repeated a French phrase for all 256 tokens."""
    llm = LLM.load(smollm2_path)
    reply = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                     temperature=0)
    assert reply == "The capital of France is Paris."
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "# The capital of France is Paris." in readme


def test_the_default_model_notice_says_fetching_only_when_it_fetches(smollm2_path):
    proc = pyllm("generate", "Hello", "--max-new-tokens", "2", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "no --model: using smollm2-135m-instruct" in proc.stderr
    assert "fetch" not in proc.stderr.lower()   # installed or cached: nothing is fetched, nothing said
