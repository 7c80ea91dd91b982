"""`pyllm serve` driven with OpenAI's own Python client on loopback: every endpoint, the fields they
take, streaming against non-streaming against pyllm.LLM, stop strings, errors in OpenAI's shape,
dropped streams, a full queue, and 16 clients at once (each gets what it gets alone)."""

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import chromium, quick_train  # noqa: E402
from pyllm.engine import EngineConfig  # noqa: E402
from pyllm.llm import LLM  # noqa: E402
from pyllm.model import Model, ModelConfig  # noqa: E402
from pyllm.serve import create_app  # noqa: E402
from pyllm.tokenizer import Tokenizer  # noqa: E402

NAME = "tiny"


TEXT = ("hello world, the cat sat on the mat. the dog ran to the park and the cat sat on the dog. "
        "def f(x): return x + 1\n é à ü ñ 中文 ")


@pytest.fixture(scope="module")
def tiny():
    """A small Llama trained for a few seconds on a few sentences: it writes text-like output."""
    tok = Tokenizer.train([TEXT * 30], 320, special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=4,
                              n_kv_head=2, n_embd=64, intermediate_size=96), seed=0)
    quick_train(model, tok.encode(TEXT * 40), 120, 64)
    return LLM(model, tok)


class Server:
    """A uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.time() + 60
        while get(self.url + "/health")[0] != 200:
            assert time.time() < deadline, "the model did not load"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url, body, headers=None, raw=False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny):
    s = Server(create_app(lambda: tiny, NAME, engine_config=EngineConfig(max_batch=4, max_queue=32)))
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello the cat"}]


def test_health_says_loading_until_the_model_is_there(tiny):
    release = threading.Event()

    def load():
        release.wait(30)
        return tiny
    s = Server(create_app(load, NAME))
    try:
        status, body = get(s.url + "/health")
        assert status == 503 and json.loads(body)["status"] == "loading"
        status, body = post(s.url + "/v1/chat/completions", {"messages": CONVERSATION})
        assert status == 503 and body["error"]["code"] == "loading"
        release.set()
        s.wait_ready()
        assert json.loads(get(s.url + "/health")[1]) == {"status": "ok", "model": NAME}
    finally:
        s.stop()


def test_models_and_unknown_models(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CONVERSATION)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    status, body = get(server.url + "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)


def test_chat_streamed_equals_unstreamed_equals_llm_chat(client, tiny):
    kwargs = dict(model=NAME, messages=CONVERSATION, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert text == "".join(tiny.chat(CONVERSATION, 40, stream=True, temperature=0, repetition_penalty=1.0))
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == tiny.count_tokens(CONVERSATION)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_equal_llm_generate_and_give_logprobs(client, tiny, server):
    prompt = "the cat sat"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == tiny.generate(prompt, 12, temperature=0)
    assert choice.finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(value)   # greedy: the top one
    ids = tiny.tokenizer.encode(prompt)
    logits = tiny.model(np.array([ids]))[0, -1].astype(np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert lp.token_logprobs[0] == pytest.approx(expected.max(), abs=1e-3)
    streamed = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    status, body = post(server.url + "/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 12,
                                                          "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == choice.text   # a prompt of token ids


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and entry.bytes is not None
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_stop_strings_never_show_even_while_streaming(client, tiny):
    free = client.completions.create(model=NAME, prompt="hello", max_tokens=40, temperature=0).choices[0].text
    assert len(free) > 12
    stop = free[6:9]   # text the model will produce: the reply must end before it
    r = client.completions.create(model=NAME, prompt="hello", max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == free[:free.index(stop)] and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="hello", max_tokens=40,
                                                                   temperature=0, stop=stop, stream=True)]
    shown = ""
    for piece in pieces:
        shown += piece
        assert stop not in shown
    assert shown == free[:free.index(stop)]
    assert tiny.generate("hello", 40, temperature=0, stop=[stop]) == shown


def test_seeds_repeat_and_settings_apply(client):
    kwargs = dict(model=NAME, prompt="the", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert a == b
    others = {client.completions.create(**{**kwargs, "seed": s}).choices[0].text for s in range(8, 12)}
    assert len(others | {a}) > 1
    penalized = client.completions.create(model=NAME, prompt="the", max_tokens=20, temperature=0,
                                          presence_penalty=2.0, frequency_penalty=2.0).choices[0].text
    plain = client.completions.create(model=NAME, prompt="the", max_tokens=20, temperature=0).choices[0].text
    assert penalized != plain
    extra = client.completions.create(model=NAME, prompt="the", max_tokens=5, temperature=0.8, seed=1,
                                      extra_body={"top_k": 1}).choices[0].text
    assert extra == client.completions.create(model=NAME, prompt="the", max_tokens=5, temperature=0).choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"messages": CONVERSATION, "temperature": 3}, "temperature"),
    ({"messages": CONVERSATION, "temperature": "hot"}, "temperature"),
    ({"messages": CONVERSATION, "max_tokens": 0}, "max_tokens"),
    ({"messages": CONVERSATION, "top_p": 0}, "top_p"),
    ({"messages": CONVERSATION, "n": 2}, "n"),
    ({"messages": CONVERSATION, "stop": [""]}, "stop"),
    ({"messages": CONVERSATION, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": CONVERSATION, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CONVERSATION, "frobnicate": 1}, "frobnicate"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": CONVERSATION, "response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_fields_are_400s_that_name_them(server, body, param):
    status, reply = post(server.url + "/v1/chat/completions", {"model": NAME, **body})
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"


def test_bad_bodies_and_prompts_too_long(server, tiny):
    status, reply = post(server.url + "/v1/chat/completions", b"{not json", raw=True)
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    status, reply = post(server.url + "/v1/chat/completions", [1, 2], raw=False)
    assert status == 400
    long = {"model": NAME, "messages": [{"role": "user", "content": "the cat sat on the mat " * 200}]}
    status, reply = post(server.url + "/v1/chat/completions", long)
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, reply = post(server.url + "/v1/completions", {"model": NAME, "prompt": [10 ** 6]})
    assert status == 400 and reply["error"]["param"] == "prompt"
    # A body announced larger than the server takes: answered 413 from the headers, the body unread.
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 5242880\r\n\r\n{")
        answer = b""
        while b'"too_large"' not in answer and len(answer) < 65536:
            piece = connection.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"too_large"' in answer
    status, reply = post(server.url + "/v1/completions", {"model": NAME, "prompt": "hi", "echo": True})
    assert status == 400 and reply["error"]["param"] == "echo"


def test_an_api_key_is_required_when_set(tiny):
    s = Server(create_app(lambda: tiny, NAME, api_key="sesame"))
    try:
        s.wait_ready()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert ok.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].text is not None
        assert get(s.url + "/")[0] == 200 and get(s.url + "/health")[0] == 200   # the page asks for the key
        assert get(s.url + "/metrics")[0] == 401
    finally:
        s.stop()


def test_tokenize_detokenize_embeddings_and_metrics(client, server, tiny):
    status, body = post(server.url + "/tokenize", {"content": "hello world"})
    assert status == 200 and body["tokens"] == tiny.tokenizer.encode("hello world")
    status, back = post(server.url + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["content"] == "hello world"
    assert post(server.url + "/detokenize", {"tokens": [-1]})[0] == 400
    floats = client.embeddings.create(model=NAME, input=["hello world", "the cat"], encoding_format="float")
    packed = client.embeddings.create(model=NAME, input="hello world")   # the client asks for base64
    vector = np.array(floats.data[0].embedding)
    assert vector.shape == (64,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(np.array(packed.data[0].embedding), vector, atol=1e-6)
    hidden = tiny.model.hidden_states(np.array([tiny.tokenizer.encode("hello world")]))[0].mean(axis=0)
    assert np.allclose(vector, hidden / np.linalg.norm(hidden), atol=1e-5)
    assert floats.usage.prompt_tokens == len(tiny.tokenizer.encode("hello world")) + len(tiny.tokenizer.encode("the cat"))
    raw = base64.b64decode(post(server.url + "/v1/embeddings", {"input": "x", "encoding_format": "base64"})[1]
                           ["data"][0]["embedding"])
    assert len(raw) == 4 * 64
    status, text = get(server.url + "/metrics")
    text = text.decode()
    for name in ("pyllm_requests_total", "pyllm_generation_tokens_total", "pyllm_queue_length",
                 "pyllm_batch_size_mean", "pyllm_time_to_first_token_seconds_sum", "pyllm_http_requests_total"):
        assert f"# TYPE {name} " in text
    generated = [line for line in text.splitlines() if line.startswith("pyllm_generation_tokens_total ")]
    assert int(generated[0].split()[1]) > 0


def test_a_dropped_stream_frees_its_slot(server):
    def running():
        text = get(server.url + "/metrics")[1].decode()
        return int(next(line for line in text.splitlines() if line.startswith("pyllm_running_requests ")).split()[1])
    body = json.dumps({"model": NAME, "prompt": "the", "max_tokens": 200, "stream": True}).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert connection.recv(4096)   # the stream has started
    connection.close()
    deadline = time.time() + 20
    while running():
        assert time.time() < deadline, "the dropped request still runs"
        time.sleep(0.05)
    status, body = post(server.url + "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 3})
    assert status == 200


def test_a_full_queue_answers_429(tiny):
    app = create_app(lambda: tiny, NAME, engine_config=EngineConfig(max_batch=1, max_queue=1))
    s = Server(app)
    release = threading.Event()
    try:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        first = client.completions.create(model=NAME, prompt="the", max_tokens=200, stream=True)
        next(iter(first))   # running: it holds the one slot
        # The engine held between two steps (a job on its thread), so the first cannot finish early.
        threading.Thread(target=app.state.service.engine.call, args=(release.wait, 60), daemon=True).start()
        waiting = threading.Thread(target=lambda: client.completions.create(model=NAME, prompt="a", max_tokens=2))
        waiting.start()
        deadline = time.time() + 20
        while "pyllm_queue_length 1" not in get(s.url + "/metrics")[1].decode():
            assert time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt="b", max_tokens=2)
        release.set()
        first.close()
        waiting.join(timeout=60)
    finally:
        release.set()
        s.stop()


def test_sixteen_clients_at_once_each_get_what_they_get_alone(client, tiny):
    prompts = [f"{w} the cat" for w in ("hello", "def", "mat", "world", "sat", "on", "x", "return")] * 2
    alone = {p: tiny.generate(p, 24, temperature=0) for p in set(prompts)}
    results, errors = [None] * len(prompts), []

    def run(i):
        try:
            stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=24, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except Exception as exc:   # reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results == [alone[p] for p in prompts]


def test_the_chat_page_is_one_self_contained_file(server):
    status, html = get(server.url + "/")
    html = html.decode()
    assert status == 200 and "<title>pyllm chat</title>" in html and "/v1/chat/completions" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html   # no outside resources


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def test_json_mode_parses_fifty_times_out_of_fifty(client):
    """The tiny model writes English, not JSON: every document here is the mask's doing. Sampled at
    temperature 1 with fifty seeds and a short budget, so many replies are cut and must still close."""
    replies = [None] * 50

    def run(first):
        for i in range(first, 50, 10):
            r = client.chat.completions.create(model=NAME, messages=CONVERSATION, temperature=1.0, seed=i,
                                               max_tokens=12 + i % 30, response_format={"type": "json_object"})
            replies[i] = r.choices[0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    values = [json.loads(c.message.content) for c in replies]
    assert all(isinstance(v, dict) for v in values)
    assert {c.finish_reason for c in replies} <= {"stop", "length"}
    unconstrained = client.chat.completions.create(model=NAME, messages=CONVERSATION, temperature=0, max_tokens=12)
    with pytest.raises(ValueError):
        json.loads(unconstrained.choices[0].message.content)


def test_json_schema_output_validates_streamed_or_not(client):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(10):
        r = client.chat.completions.create(model=NAME, messages=CONVERSATION, temperature=1.0, seed=seed,
                                           max_tokens=48, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        stream = client.chat.completions.create(model=NAME, messages=CONVERSATION, temperature=1.0, seed=seed,
                                                max_tokens=48, response_format=fmt, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    r = client.completions.create(model=NAME, prompt="the cat", max_tokens=40, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^a"}, "pattern is not supported"),
    ({"type": "object", "properties": {"a": {"type": "when"}}}, "unknown type 'when'"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "$ref"),
])
def test_schemas_outside_the_subset_are_400s(server, schema, words):
    status, reply = post(server.url + "/v1/chat/completions", {
        "model": NAME, "messages": CONVERSATION,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert status == 400 and reply["error"]["param"] == "response_format", reply
    assert words in reply["error"]["message"]


def test_the_chat_page_streams_replies_in_chromium_and_keeps_the_conversation(server, tiny):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    browser = chromium()
    # Each engine step waits 10 ms (a job on its thread), so the tokens arrive apart and the page's
    # pieces can be seen whatever the machine's speed.
    engine, done = server.app.state.service.engine, threading.Event()

    def throttle():
        while not done.is_set():
            engine.call(time.sleep, 0.01)
    slow = threading.Thread(target=throttle, daemon=True)
    slow.start()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "status").text == NAME)   # it asked /v1/models
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        # Every text the reply shows on its way, to see it arrive in pieces rather than at once.
        browser.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const turns = document.querySelectorAll('.turn.assistant');
              if (turns.length) window.seen.push(turns[turns.length - 1].textContent);
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")
        history = []
        for turn, words in enumerate(["hello the cat", "and the dog"]):
            browser.find_element(By.ID, "input").send_keys(words, Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done='1']")) == turn + 1)
            reply = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
            assert "error" not in reply.get_attribute("class"), reply.text
            history.append({"role": "user", "content": words})
            expected = "".join(tiny.chat(history, 24, stream=True, temperature=0, repetition_penalty=1.0))
            assert reply.get_attribute("textContent") == expected   # the second turn continues the first
            history.append({"role": "assistant", "content": expected})
            meta = browser.find_elements(By.CSS_SELECTOR, ".meta")[-1].text
            assert "tokens/s" in meta and "first token after" in meta
        partial = {t for t in browser.execute_script("return window.seen") if t}
        assert len(partial) > 2, partial    # streamed: more texts shown than the two finished replies
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user")) == 2
    finally:
        done.set()
        slow.join(timeout=10)
        browser.quit()


def test_smollm2_served_answers_as_llm_chat_and_a_second_turn_reuses_the_first(smollm2_path):
    """The real default model behind the server: its chat template, its end token as the stop (never
    shown), and a conversation's next turn continuing from the cached history."""
    llm = LLM.load(smollm2_path)
    s = Server(create_app(lambda: llm, "smollm2", engine_config=EngineConfig(max_batch=2)))
    try:
        s.wait_ready()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        history = [{"role": "user", "content": "What is the capital of France? One word."}]
        first = client.chat.completions.create(model="smollm2", messages=history, max_tokens=24, temperature=0)
        text = first.choices[0].message.content
        assert text == "".join(llm.chat(history, 24, stream=True, temperature=0, repetition_penalty=1.0))
        assert "Paris" in text and "<|im_end|>" not in text and first.choices[0].finish_reason == "stop"
        history += [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
        second = client.chat.completions.create(model="smollm2", messages=history, max_tokens=24, temperature=0)
        assert second.choices[0].message.content == "".join(llm.chat(history, 24, stream=True, temperature=0, repetition_penalty=1.0))
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "A cat as JSON."}],
                                           max_tokens=40, temperature=0.8, seed=1,
                                           response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    finally:
        s.stop()
