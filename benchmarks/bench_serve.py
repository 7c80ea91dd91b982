"""`pyllm serve` under load, on loopback: the default model (SmolLM2-135M-Instruct Q4_1) served by a
`pyllm serve` process, streaming clients in this one. Eight requests at once against the same eight
one after another (the throughput ratio is continuous batching's gain; the target is 3x), and sixteen
at once against sixteen one after another; each with its time to first token and the tokens/s each
stream sees. Two workloads: chat-sized (prompts of 16 to 72 tokens, replies of 128) and long
prompts (24 to 220 tokens, replies of 64), where the prompts' share of the work, the same on both
sides, bounds the ratio.

Every request is a /v1/completions stream of a prompt of token ids (cut from the benchmark text,
different per request) at temperature 0, so both sides of a row generate the same tokens (the
kernels are batch-invariant; checked on every round). The server keeps no prefix cache here
(--prefix-cache 0): every round pays for its prompts. Client work is a socket read and a JSON parse
per token, on the same two cores as the server.

Not a test of the server's answers (tests/test_serve.py) and not a peer comparison: llama.cpp's
server is not on PyPI.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

THREADS = int(os.environ.get("PYLLM_BENCH_THREADS", "2"))
# workload -> (prompt lengths of request i, reply tokens)
WORKLOADS = {"chat": (lambda i: 16 + 4 * i, 128), "long prompts": (lambda i: 24 + 28 * i, 64)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("uvicorn")
    from pyllm.data import read_default_corpus
    from pyllm.hub import smollm2_gguf
    from pyllm.tokenizer import Tokenizer

    path = smollm2_gguf(quiet=True)
    ids = Tokenizer.from_gguf(path).encode(read_default_corpus(40_000), disallowed_special=())
    prompts = {name: [ids[40 * i:40 * i + length(i)] for i in range(16)] for name, (length, _) in WORKLOADS.items()}
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "pyllm", "serve", "--model", str(path), "--port", str(port),
                                "--max-batch", "16", "--prefix-cache", "0", "--context", "1024",
                                "--threads", str(THREADS), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"pyllm serve did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/v1/models")
    model = json.loads(connection.getresponse().read())["data"][0]["id"]
    target = (port, model)
    alone = {name: [stream(target, p, WORKLOADS[name][1])["text"] for p in prompts[name]]   # what each gives alone
             for name in WORKLOADS}
    yield target, prompts, alone
    process.terminate()
    process.wait(timeout=30)


def stream(target: tuple, prompt: list[int], tokens: int) -> dict:
    """One streamed completion: its text, tokens, time to first token and tokens/s after it."""
    port, model = target
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    text, first, tokens = [], None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if choice["text"] and first is None:
                first = time.perf_counter()
            text.append(choice["text"])
    ended = time.perf_counter()
    connection.close()
    first = first or ended
    return {"text": "".join(text), "tokens": tokens, "ttft": first - started,
            "rate": (tokens - 1) / (ended - first) if ended > first else None}


def at_once(port: tuple, prompts: list, tokens: int) -> list[dict]:
    results = [None] * len(prompts)

    def run(i):
        results[i] = stream(port, prompts[i], tokens)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def one_after_another(port: tuple, prompts: list, tokens: int) -> list[dict]:
    return [stream(port, p, tokens) for p in prompts]


def _note(rounds: list[list[dict]]) -> str:
    ttft = [r["ttft"] for run in rounds for r in run]
    rate = [r["rate"] for run in rounds for r in run if r["rate"]]
    return (f"time to first token median {statistics.median(ttft) * 1e3:.0f} ms, worst {max(ttft) * 1e3:.0f} ms; "
            f"{statistics.median(rate):.0f} tok/s per stream")


@pytest.mark.parametrize("clients, workload", [(8, "chat"), (8, "long prompts"), (16, "chat")],
                         ids=["8-chat", "8-long", "16-chat"])
@pytest.mark.parametrize("together", [True, False], ids=["at once", "one after another"])
def test_streaming_clients(benchmark, server, clients, workload, together):
    port, prompts, alone = server
    prompts, alone, tokens = prompts[workload][:clients], alone[workload][:clients], WORKLOADS[workload][1]
    rounds: list = []

    def run():
        results = (at_once if together else one_after_another)(port, prompts, tokens)
        assert [r["text"] for r in results] == alone   # nothing lost or mixed up
        rounds.append(results)
        return results
    lengths = f"{len(prompts[0])}-{len(prompts[-1])}"
    benchmark.group = (f"pyllm serve: {clients} streams, prompts of {lengths} tokens, {tokens} tokens each, "
                       f"at once vs one after another")
    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info.update(impl="pyllm" if together else "one after another",
                                tokens=sum(r["tokens"] for r in rounds[0]), target=3.0 if clients == 8 else None,
                                note=_note(rounds))
