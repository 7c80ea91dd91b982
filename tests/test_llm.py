"""pyllm.LLM: text generation, streaming that never splits a character, chat templates, and the
`pyllm generate` / `pyllm chat` commands (the chat REPL driven through a pseudo-terminal)."""

import sys

import numpy as np
import pytest

import pyllm.llm as llm_module
from pyllm.cli import main as cli
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm():
    tok = Tokenizer.train(["hello world, the cat sat on the mat. " * 50, "def f(x): return x + 1\n" * 50],
                          300, special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    model.params[...] += np.random.default_rng(0).standard_normal(model.params.size).astype(np.float32) * 0.1
    return LLM(model, tok)


@pytest.fixture(scope="module")
def folder(llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    llm.save(path)
    return path


def test_streaming_reassembles_to_the_same_text(llm):
    whole = llm.generate("the cat", 30, seed=3)
    pieces = list(llm.generate("the cat", 30, seed=3, stream=True))
    assert "".join(pieces) == whole and len(pieces) > 1
    assert llm.generate("the cat", 30, seed=3) == whole
    assert llm.generate("the cat", 30, temperature=0) == llm.generate("the cat", 30, temperature=0, seed=9)


def _scripted(monkeypatch, llm, token_ids):
    """Makes generation produce exactly token_ids, one per step."""
    def fake_stream(model, ids, max_new_tokens, sampling, stop_tokens, seed):
        for t in token_ids[:max_new_tokens]:
            yield np.array([t])
    monkeypatch.setattr(llm_module, "generate_stream", fake_stream)


def test_a_character_split_across_tokens_is_held_back_until_complete(llm, monkeypatch):
    text = "né 🐈!"
    _scripted(monkeypatch, llm, list(text.encode("utf-8")))      # one byte per token
    pieces = list(llm.generate("x", 20, stream=True))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert "🐈" in pieces                                        # four tokens, one piece


def test_stop_strings_end_the_text_and_are_held_back(llm, monkeypatch):
    _scripted(monkeypatch, llm, list(b"abc\nUs") + list(b"er: more"))
    pieces = list(llm.generate("x", 50, stop=["\nUser:"], stream=True))
    assert "".join(pieces) == "abc" and not any("\n" in p for p in pieces)
    _scripted(monkeypatch, llm, list(b"abc\nUsed"))
    assert llm.generate("x", 50, stop=["\nUser:"]) == "abc\nUsed"


def test_the_end_of_text_token_stops_generation(llm, monkeypatch):
    eot = llm.tokenizer.special_tokens["<|endoftext|>"]
    _scripted(monkeypatch, llm, list(b"done") + [eot] + list(b"never"))
    assert llm.generate("x", 50) == "done"


def test_chat_templates(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Cat?"}]
    assert llm.apply_chat_template(messages) == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Cat?\nAssistant:"
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}")
    other = LLM(llm.model, llm.tokenizer, chat_template=chatml)
    assert other.apply_chat_template(messages[1:2]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role"):
        llm.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty"):
        llm.chat([])
    assert isinstance(llm.chat(messages, 10, seed=1), str)


def test_load_reads_the_saved_folder(llm, folder):
    again = LLM.load(folder)
    assert np.array_equal(again.model.params, llm.model.params)
    assert again.stop_token_ids == llm.stop_token_ids
    assert again.generate("the cat", 12, seed=4) == llm.generate("the cat", 12, seed=4)
    with pytest.raises(FileNotFoundError):
        LLM.load(folder / "missing")
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", 5)


def test_cli_profiles_a_decode_step_by_operation(folder, capsys):
    assert cli(["bench", "--profile", "decode", "--model", str(folder), "--prompt-tokens", "8", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MB a token" in out and "% of the" in out
    for op in ("qkv", "attention", "mlp_in", "head", "total"):
        assert op in out


def test_cli_generate_streams_and_shows_probabilities(folder, capsys):
    assert cli(["generate", "--model", str(folder), "the cat", "--max-new-tokens", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the cat")
    assert cli(["generate", "--model", str(folder), "the cat", "--max-new-tokens", "3", "--show-probs", "4"]) == 0
    out = capsys.readouterr().out
    assert "top:" in out and "p=" in out
    assert cli(["generate", "--model", str(folder), "x", "--top-p", "1.5"]) == 1
    assert "top_p" in capsys.readouterr().err


def test_chat_repl_through_a_pseudo_terminal(folder):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "pyllm", "chat", "--model", str(folder), "--max-new-tokens", "12",
                                           "--seed", "0"], timeout=60, encoding="utf-8", cwd=str(folder.parent))
    try:
        child.expect("/help for commands")
        child.expect("you> ")
        child.sendline("/help")
        child.expect("/reset")
        child.expect("you> ")
        child.sendline("hello there")
        child.expect("assistant> ")
        child.expect("you> ")
        for i in range(8):   # the 64-token context fills: the oldest turns go, with a notice
            child.sendline(f"tell me about the cat number {i}")
            child.expect("you> ")
            if "dropped" in child.before:
                break
        else:
            pytest.fail("the history was never trimmed to the context window")
        child.sendintr()                     # Ctrl-C at the prompt does not quit
        child.expect("quits")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("conversation reset")
        child.sendline("x " * 200)
        child.expect("too long")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_templates_as_real_models_write_them(llm):
    template = ("{% if tools %}TOOLS{% endif %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ undefined_name }}")
    other = LLM(llm.model, llm.tokenizer, chat_template=template, bos_token="<s>")
    text = other.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}])
    assert text == "<s>[user] a\n<s>[assistant] b\n"
    broken = LLM(llm.model, llm.tokenizer, chat_template="{% for %}")
    with pytest.raises(ValueError, match="chat template"):
        broken.apply_chat_template([{"role": "user", "content": "a"}])
    raising = LLM(llm.model, llm.tokenizer, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        raising.apply_chat_template([{"role": "user", "content": "a"}])
