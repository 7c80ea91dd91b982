"""Supervised fine-tuning: the masked loss by hand, bad data named by line, a model that learns."""

import dataclasses
import json

import numpy as np
import pytest

from pyllm import finetune as F
from pyllm.cli import main as cli
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm():
    tok = Tokenizer.train(["User: what is 2 plus 2?\nAssistant: 2 plus 2 is 4.\n" * 40], 300,
                          special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    return LLM(model, tok)


def test_only_the_assistant_tokens_are_learned_and_the_loss_is_their_mean(llm):
    record = {"messages": [{"role": "user", "content": "what is 2 plus 2?"},
                           {"role": "assistant", "content": "4."}]}
    ex = F._example(record, llm, 1)
    tok = llm.tokenizer
    prompt = tok.encode("User: what is 2 plus 2?\nAssistant:")
    assert ex.ids.tolist() == tok.encode("User: what is 2 plus 2?\nAssistant: 4.\n")
    learned = [int(t) for t in ex.targets if t != F.IGNORE]
    assert learned == ex.ids[len(prompt):].tolist()          # the reply and its newline, nothing else
    logits = llm.model(ex.ids[None, :])[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    by_hand = -np.mean([log_probs[t, ex.targets[t]] for t in range(len(ex.ids)) if ex.targets[t] != F.IGNORE])
    assert F.masked_loss(llm.model, [ex]) == pytest.approx(by_hand, rel=1e-5)


def test_bad_lines_are_named(llm, tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "what is 2 plus 2?", "completion": "4."})
    cases = [("{not json", "not valid JSON"), (json.dumps({"prompt": "x"}), "prompt"),
             (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
              "empty assistant"),
             (json.dumps({"prompt": "x " * 100, "completion": "y"}), "context"),
             (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant")]
    for bad, match in cases:
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(F.DataError, match=rf"d.jsonl:2: .*{match}"):
            F.read_examples(path, llm, say=lambda *_: None)
        assert len(F.read_examples(path, llm, skip_bad=True, say=lambda *_: None)) == 1


def test_sft_learns_the_examples(tmp_path):
    records = F.arithmetic_examples(60, seed=1)
    texts = [f"User: {r['messages'][0]['content']}\nAssistant: {r['messages'][1]['content']}\n" for r in records]
    tok = Tokenizer.train(texts, 400, special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=48), seed=0)
    llm = LLM(model, tok)
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = F.read_examples(data, llm)
    before = F.masked_loss(model, examples)
    log = F.sft(llm, examples, examples[:8], F.SFTConfig(epochs=15, batch_size=8, lr=3e-3), out_dir=tmp_path / "out",
                progress=False)
    assert log[-1]["val_loss"] < 0.5 * before
    again = LLM.load(tmp_path / "out")
    assert F.masked_loss(again.model, examples[:8]) == pytest.approx(log[-1]["val_loss"], rel=1e-4)


def test_cli_finetune_sft(tmp_path, llm, capsys):
    folder = tmp_path / "base"
    llm.save(folder)
    rc = cli(["finetune", "sft", "--model", str(folder), "--data", str(tmp_path / "ex.jsonl"), "--example", "30",
              "--out", str(tmp_path / "tuned"), "--epochs", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation loss before" in out and "validation loss after" in out
    assert (tmp_path / "tuned" / "model.safetensors").exists()
    rc = cli(["finetune", "sft", "--model", str(folder), "--data", str(tmp_path / "ex.jsonl"), "--lora-rank", "4",
              "--out", str(tmp_path / "lora"), "--epochs", "1", "--no-progress"])     # a GPT-2 model's adapters
    assert rc == 0
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    tuned = LLM.load(tmp_path / "lora")
    assert not np.array_equal(tuned.model.params, LLM.load(folder).model.params)


def test_answer_accuracy_checks_the_final_number(llm, monkeypatch):
    records = [{"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
               {"prompt": "What is 4 times 4?", "completion": "4 times 4 is 16."}]
    replies = iter(["It is 5.", "It is 15."])
    monkeypatch.setattr(llm, "chat", lambda messages, *a, **k: next(replies))
    assert F.answer_accuracy(llm, records) == 0.5


def test_lora_sft_trains_only_the_adapters_and_saves_merged_and_adapter(tmp_path):
    pytest.importorskip("torch")
    records = F.arithmetic_examples(40, seed=3)
    texts = [f"User: {r['messages'][0]['content']}\nAssistant: {r['messages'][1]['content']}\n" for r in records]
    tok = Tokenizer.train(texts, 350, special_tokens=["<|endoftext|>"], progress=False)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1,
                      n_embd=32, intermediate_size=64)
    model = Model(cfg, seed=0)
    base = model.params.copy()
    llm = LLM(model, tok)
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = F.read_examples(data, llm)
    before = F.masked_loss(model, examples)
    log = F.sft(llm, examples, examples[:8], F.SFTConfig(epochs=10, lr=1e-2, lora_rank=4), out_dir=tmp_path / "out",
                progress=False, say=lambda *_: None)
    assert log[-1]["val_loss"] < before - 0.1        # rank-4 adapters on a random base: slow but real
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    merged = LLM.load(tmp_path / "out").model
    assert not np.array_equal(merged.params, base)          # the adapters were merged in
    assert F.masked_loss(merged, examples[:8]) == pytest.approx(log[-1]["val_loss"], rel=1e-3)


def test_dpo_loss_and_gradients_equal_torch(llm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pyllm.io.hf import config_to_hf

    model = llm.model
    pair = F.Pair(F._example({"prompt": "what is 2 plus 2?", "completion": "4."}, llm, 1),
                  F._example({"prompt": "what is 2 plus 2?", "completion": "5, I think."}, llm, 1), 1)
    ref, beta = (-3.0, -4.5), 0.5
    model.zero_grad()
    stats = F.dpo_forward_backward(model, pair, ref, beta)

    cfg = transformers.GPT2Config(**config_to_hf(model.config))
    cfg._attn_implementation = "eager"
    twin = transformers.GPT2LMHeadModel(cfg)
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, strict=False)
    twin.tie_weights()

    def logprob(ex):
        logits = twin(torch.from_numpy(ex.ids[None, :])).logits[0]
        keep = torch.from_numpy(ex.targets != F.IGNORE)
        targets = torch.from_numpy(np.where(ex.targets == F.IGNORE, 0, ex.targets))
        return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0][keep].sum()

    z = beta * ((logprob(pair.chosen) - ref[0]) - (logprob(pair.rejected) - ref[1]))
    loss = -torch.nn.functional.logsigmoid(z)
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    params = dict(twin.named_parameters())
    for name, grad in model.named_grads().items():
        theirs = params[name].grad.numpy()
        assert np.abs(grad - theirs).max() <= 1e-4 * max(np.abs(theirs).max(), 1e-6), name


def test_dpo_shifts_preferences(tmp_path):
    records = F.arithmetic_preferences(40, seed=5)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']}\n{r['rejected']}\n" for r in records]
    tok = Tokenizer.train(texts, 400, special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32), seed=0)
    llm = LLM(model, tok)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = F.read_pairs(path, llm)
    before = F.preference_accuracy(model, pairs)
    log = F.dpo(llm, pairs, F.SFTConfig(epochs=6, batch_size=8, lr=3e-3), beta=0.5, progress=False)
    assert F.preference_accuracy(model, pairs) > max(before, 0.75)
    assert log[-1]["loss"] < log[0]["loss"]
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(F.DataError, match=r"prefs.jsonl:1: .*rejected"):
        F.read_pairs(path, llm)


def test_cli_finetune_dpo(tmp_path, llm, capsys):
    folder = tmp_path / "base"
    llm.save(folder)
    rc = cli(["finetune", "dpo", "--model", str(folder), "--data", str(tmp_path / "p.jsonl"), "--example", "20",
              "--out", str(tmp_path / "tuned"), "--no-progress", "--lr", "1e-3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "preference accuracy before" in out and "reward margin" in out
    assert (tmp_path / "tuned" / "model.safetensors").exists()


def _interrupt_at_call(model, call: int):
    """Ctrl-C (SIGINT) during the model's `call`-th forward_backward."""
    import signal

    real, calls = model.forward_backward, [0]

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)
    model.forward_backward = forward_backward


def _without_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in records]


@pytest.fixture(scope="module")
def arithmetic():
    records = F.arithmetic_examples(40, seed=3)
    texts = [f"User: {r['messages'][0]['content']}\nAssistant: {r['messages'][1]['content']}\n" for r in records]
    tok = Tokenizer.train(texts, 350, special_tokens=["<|endoftext|>"], progress=False)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1,
                      n_embd=32, intermediate_size=64)
    return records, tok, cfg


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_interrupted_and_resumed_sft_equals_an_uninterrupted_run(tmp_path, arithmetic, lora_rank):
    records, tok, model_cfg = arithmetic
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = F.SFTConfig(epochs=2, batch_size=8, lr=1e-2, lora_rank=lora_rank, lora_dropout=0.1 if lora_rank else 0.0,
                      checkpoint_interval=3)
    quiet = dict(progress=False, say=lambda *_: None)

    def fresh():
        llm = LLM(Model(model_cfg, seed=0), tok)
        examples = F.read_examples(data, llm)
        return llm, examples[8:], examples[:8]

    llm, train, val = fresh()
    whole = F.sft(llm, train, val, cfg, out_dir=tmp_path / "whole", **quiet)
    llm, train, val = fresh()
    _interrupt_at_call(llm.model, 5)      # during step 5 of 8: steps 1-5 are kept
    with pytest.raises(F.FinetuneInterrupted, match="step 5 of 8"):
        F.sft(llm, train, val, cfg, out_dir=tmp_path / "cut", **quiet)
    assert (tmp_path / "cut" / "checkpoint" / "state.json").exists()
    llm, train, val = fresh()
    with pytest.raises(ValueError, match="lr=0.01"):
        F.sft(llm, train, val, dataclasses.replace(cfg, lr=1e-3, resume=True), out_dir=tmp_path / "cut", **quiet)
    with pytest.raises(ValueError, match="data differs"):
        F.sft(llm, train[1:], val, dataclasses.replace(cfg, resume=True), out_dir=tmp_path / "cut", **quiet)
    resumed = F.sft(llm, train, val, dataclasses.replace(cfg, resume=True), out_dir=tmp_path / "cut", **quiet)
    assert _without_times(resumed) == _without_times(whole)
    assert not (tmp_path / "cut" / "checkpoint").exists()
    a, b = (LLM.load(tmp_path / d).model for d in ("whole", "cut"))
    np.testing.assert_array_equal(a.params, b.params)


def test_interrupted_and_resumed_dpo_keeps_its_reference(tmp_path):
    records = F.arithmetic_preferences(24, seed=5)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']}\n{r['rejected']}\n" for r in records]
    tok = Tokenizer.train(texts, 400, special_tokens=["<|endoftext|>"], progress=False)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = F.SFTConfig(epochs=2, batch_size=4, lr=3e-3, checkpoint_interval=2)
    quiet = dict(progress=False, say=lambda *_: None)

    def fresh(seed=0):
        llm = LLM(Model(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32),
                        seed=seed), tok)
        return llm, F.read_pairs(path, llm)

    llm, pairs = fresh()
    whole = F.dpo(llm, pairs, cfg, beta=0.5, out_dir=tmp_path / "whole", **quiet)
    llm, pairs = fresh()
    _interrupt_at_call(llm.model, 2 * 4 * 7)     # two backward passes per pair, 4 pairs a step: step 7
    with pytest.raises(F.FinetuneInterrupted, match="step 7 of 12"):
        F.dpo(llm, pairs, cfg, beta=0.5, out_dir=tmp_path / "cut", **quiet)
    # Resumed on another model: the checkpoint's weights and its stored reference (not one
    # recomputed from this model) give the uninterrupted run's records.
    llm, pairs = fresh(seed=1)
    before = llm.model.params.copy()
    with pytest.raises(ValueError, match="beta"):
        F.dpo(llm, pairs, dataclasses.replace(cfg, resume=True), beta=0.1, out_dir=tmp_path / "cut", **quiet)
    np.testing.assert_array_equal(llm.model.params, before)     # a refused resume changes nothing
    resumed = F.dpo(llm, pairs, dataclasses.replace(cfg, resume=True), beta=0.5, out_dir=tmp_path / "cut", **quiet)
    assert _without_times(resumed) == _without_times(whole)


def test_cli_finetune_lora_keeps_a_gguf_base_quantized(tmp_path, smollm2_path, monkeypatch, capsys):
    from pyllm import cli as C

    seen = {}
    real = C._finetune_llm

    def spy(model_arg, lora_rank):
        llm = real(model_arg, lora_rank)
        seen["quantized"] = bool(llm.model.quantized)
        return llm
    monkeypatch.setattr(C, "_finetune_llm", spy)
    rc = cli(["finetune", "sft", "--model", str(smollm2_path), "--data", str(tmp_path / "ex.jsonl"), "--example", "4",
              "--out", str(tmp_path / "tuned"), "--epochs", "0.5", "--batch-size", "2", "--lora-rank", "2",
              "--lora-dropout", "0.05", "--no-progress"])
    assert rc == 0 and seen["quantized"]
    assert "kept quantized" in capsys.readouterr().out
    config = json.loads((tmp_path / "tuned" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_dropout"] == 0.05
    assert (tmp_path / "tuned" / "model.safetensors").stat().st_size > 500e6     # merged into float32 weights
    # The adapter on its own, on the quantized file: the same greedy text as the merged model.
    args = ["generate", "What is 2 plus 3?", "--temperature", "0", "--max-new-tokens", "6"]
    assert cli(args + ["--model", str(smollm2_path), "--adapter", str(tmp_path / "tuned" / "adapter")]) == 0
    adapted = capsys.readouterr().out
    assert cli(args + ["--model", str(tmp_path / "tuned")]) == 0
    merged = capsys.readouterr().out
    assert adapted.startswith("What is 2 plus 3?") and len(adapted) > len("What is 2 plus 3?")
    assert adapted == merged or sum(a != b for a, b in zip(adapted, merged)) < 10   # int8 vs float products


def test_cli_ctrl_c_before_training_is_a_message(tmp_path, monkeypatch, capsys):
    from pyllm import cli as C

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(C, "_finetune_llm", interrupted)
    rc = cli(["finetune", "sft", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 130 and "interrupted" in capsys.readouterr().err


def test_a_lora_run_names_its_base_so_peft_opens_the_adapter_alone(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    records = F.arithmetic_examples(24, seed=5)
    texts = [f"User: {r['messages'][0]['content']}\nAssistant: {r['messages'][1]['content']}\n" for r in records]
    tok = Tokenizer.train(texts, 330, special_tokens=["<|endoftext|>"], progress=False)
    cfg = ModelConfig(arch="qwen3", vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_kv_head=1,
                      n_embd=32, intermediate_size=64)
    LLM(Model(cfg, seed=1), tok).save(tmp_path / "base")
    llm = LLM.load(tmp_path / "base")
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = F.read_examples(data, llm)
    F.sft(llm, examples, examples[:4], F.SFTConfig(epochs=2, lr=1e-2, lora_rank=4), out_dir=tmp_path / "out",
          progress=False, say=lambda *_: None)
    named = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str((tmp_path / "base").resolve())
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "adapter")
    theirs.eval()
    ids = np.array([tok.encode("User: what is 3 plus 4?")])
    with torch.no_grad():
        logits = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(LLM.load(tmp_path / "out").model(ids), logits, rtol=1e-4, atol=1e-4)
