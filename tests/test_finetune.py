"""Supervised fine-tuning: the masked loss by hand, bad data named by line, a model that learns."""

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
