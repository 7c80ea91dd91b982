"""The HTTP API: OpenAI's chat completions, completions and embeddings, plus /health, /v1/models,
/tokenize, /detokenize, /metrics and the chat page, over one continuous-batching engine.

Every request becomes token ids here (the chat template, the tokenizer) and its tokens become text
here (whole characters, stop strings never shown even in part); the engine decodes all running
requests together. Bad input of any kind is answered with a 4xx in OpenAI's error shape. Not the
batching (pyllm.engine), nor the checks of each field (protocol.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Optional

import numpy as np

try:   # the serve extra: `pip install "pyllm[serve]"`; pyllm imports without it
    import uvicorn
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    MISSING = None
except ImportError as exc:
    MISSING, uvicorn = exc, None

from pyllm.constrain import SchemaError, json_mask, vocabulary_bytes
from pyllm.engine import Engine, EngineConfig, Event, QueueFull, Request
from pyllm.generate import SamplingConfig
from pyllm.llm import LLM, TextStream
from pyllm.serve.protocol import ApiError, Fields, Generation, generation, messages

MAX_BODY = 4 << 20    # bytes of a request body; more is a 413


@dataclass
class Service:
    """What the routes share: the model once loaded, its engine, and the server's settings."""

    name: str
    api_key: Optional[str]
    engine_config: EngineConfig
    llm: Optional[LLM] = None
    engine: Optional[Engine] = None
    vocab: object = None                 # the tokens' bytes, for JSON masks (built at load)
    error: Optional[str] = None          # why loading failed
    started: float = field(default_factory=time.time)
    http_requests: dict = field(default_factory=dict)   # (route, status) -> count

    def ready(self) -> tuple:
        if self.engine is None:
            raise ApiError(503, self.error or "the model is still loading", None, "loading")
        return self.llm, self.engine


def create_app(load: Callable[[], LLM], name: str, api_key: Optional[str] = None,
               engine_config: Optional[EngineConfig] = None) -> FastAPI:
    """The FastAPI app; load() runs on a thread at start-up (GET /health answers 503 until it is done)."""
    if MISSING is not None:
        raise RuntimeError(f'pyllm serve needs FastAPI and uvicorn: pip install "pyllm[serve]" ({MISSING})')
    service = Service(name, api_key, engine_config or EngineConfig())

    def load_in_background():
        try:
            llm = load()
            service.vocab = vocabulary_bytes(llm.tokenizer)
            service.llm, service.engine = llm, Engine(llm.model, service.engine_config)
        except Exception as exc:   # reported by /health and every route
            service.error = f"the model failed to load: {exc}"

    async def lifespan(app):
        threading.Thread(target=load_in_background, name="pyllm-load", daemon=True).start()
        yield
        if service.engine is not None:
            service.engine.close()

    app = FastAPI(title="pyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        path = request.url.path
        try:
            if service.api_key and path not in ("/", "/health"):
                if request.headers.get("authorization") != f"Bearer {service.api_key}":
                    raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", None,
                                   "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "too_large")
            response = await call_next(request)
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status)
        key = (path, response.status_code)
        service.http_requests[key] = service.http_requests.get(key, 0) + 1
        return response

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):   # a bug: a clear 500, never a stack trace
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", None,
                                     "not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request, exc):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                     "method_not_allowed").body(), status_code=405)

    @app.get("/health")
    async def health():
        if service.engine is None:
            return JSONResponse({"status": "error" if service.error else "loading", "message": service.error},
                                status_code=503)
        return {"status": "ok", "model": service.name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("pyllm.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        service.ready()
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        service.ready()
        _check_model(service, model_id)
        return _model_card(service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        llm, engine = service.ready()
        f = Fields(await _json(request))
        _check_model(service, f.string("model"))
        conversation = messages(f.raw("messages"))
        gen = generation(f, chat=True)
        f.done()
        try:   # a message's text that spells a special token stays text: no message opens a turn
            ids = llm.encode_chat(conversation)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_value") from None
        stop = gen.stop + (["\nUser:"] if llm.chat_template is None else [])
        return await _complete(service, request, ids, gen, stop, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        llm, engine = service.ready()
        f = Fields(await _json(request), known_extra=("echo", "best_of", "suffix"))
        _check_model(service, f.string("model"))
        prompt = f.raw("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            _check_ids(llm, ids, "prompt")
        elif isinstance(prompt, str) and prompt:
            ids = llm.encode_prompt(prompt)
        else:
            raise ApiError(400, "prompt: must be a non-empty string (or a list of token ids)", "prompt",
                           "invalid_value")
        gen = generation(f, chat=False)
        for name, harmless in (("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None, ""))):
            value = f.body.get(name)
            if not any(value is h or (type(value) is type(h) and value == h) for h in harmless):
                raise ApiError(400, f"{name}: is not supported", name, "unsupported")
        f.done()
        return await _complete(service, request, ids, gen, gen.stop, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: HttpRequest):
        llm, engine = service.ready()
        f = Fields(await _json(request), known_extra=("user",))
        _check_model(service, f.string("model"))
        given = f.raw("input")
        encoding = f.string("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, "encoding_format: must be \"float\" or \"base64\"", "encoding_format",
                           "invalid_value")
        f.raw("dimensions")
        f.done()
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or len(texts) > 256 \
                or not all(isinstance(t, str) and t for t in texts):
            raise ApiError(400, "input: must be a non-empty string or a list of at most 256 of them", "input",
                           "invalid_value")
        data, used = [], 0
        for i, text in enumerate(texts):
            ids = llm.tokenizer.encode(text, allowed_special="all")
            if len(ids) > engine.context:
                raise ApiError(400, f"input[{i}] has {len(ids)} tokens; at most {engine.context}", "input",
                               "context_length_exceeded")
            vector = await asyncio.to_thread(engine.call, _embedding, llm.model, ids)
            if encoding == "base64":   # little-endian float32 bytes, as OpenAI's clients decode them
                vector = base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vector})
            used += len(ids)
        return {"object": "list", "data": data, "model": service.name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        llm, _ = service.ready()
        f = Fields(await _json(request))
        text = f.string("content", required=True)
        special = f.boolean("add_special", False)
        f.done()
        ids = llm.tokenizer.encode(text, allowed_special="all" if special else ())
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        llm, _ = service.ready()
        f = Fields(await _json(request))
        ids = f.raw("tokens")
        f.done()
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "tokens: must be a list of token ids", "tokens", "invalid_value")
        _check_ids(llm, ids, "tokens")
        return {"content": llm.tokenizer.decode(ids)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_metrics(service), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------------- completions

async def _complete(service: Service, http: HttpRequest, ids: list, gen: Generation, stop: list, chat: bool):
    llm, engine = service.llm, service.engine
    room = engine.context - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this server holds {engine.context} per request "
                            f"(prompt and reply)", "messages" if chat else "prompt", "context_length_exceeded")
    max_new = min(gen.max_tokens or room, room)
    sampling = SamplingConfig(gen.temperature, gen.top_k, gen.top_p, gen.min_p, gen.repetition_penalty,
                              gen.presence_penalty, gen.frequency_penalty)
    mask = None
    if gen.response_format is not None:   # json_object: any JSON; json_schema: its schema
        schema = (gen.response_format.get("json_schema") or {}).get("schema", {"type": "object"})
        try:
            mask = json_mask(service.vocab, schema, llm.model.config.vocab_size, llm.stop_token_ids,
                             max_new)
        except (SchemaError, ValueError) as exc:
            raise ApiError(400, f"response_format: {exc}", "response_format", "invalid_schema") from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request = Request(ids, max_new, sampling, gen.seed, llm.stop_token_ids, gen.logprobs, mask)
    try:
        handle = engine.submit(request, listener=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy ({exc}); try again", None, "queue_full") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages" if chat else "prompt", "invalid_value") from None
    reply = _Reply(llm, stop, gen, chat, handle)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not gen.stream:
        try:
            while not reply.done:
                reply.take(await events.get())
        finally:
            handle.cancel()     # ended already, or the client went away
        return reply.response(ident, created, service.name, len(ids), handle.cached_tokens)

    async def stream():
        try:
            if chat:
                yield _sse(_chunk(ident, created, service.name, chat, {"role": "assistant", "content": ""}, None))
            while not reply.done:
                text, logprobs = reply.take(await events.get())
                if text or logprobs:
                    yield _sse(_chunk(ident, created, service.name, chat, text, None, logprobs))
            yield _sse(_chunk(ident, created, service.name, chat, "" if not chat else {}, reply.finish_reason))
            if gen.include_usage:
                yield _sse({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": service.name, "choices": [],
                            "usage": _usage(len(ids), reply.generated, handle.cached_tokens)})
            yield "data: [DONE]\n\n"
        finally:   # normal end, or the client dropped the stream: its row is freed either way
            handle.cancel()
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """A request's events turned into text, logprobs and a finish reason."""

    def __init__(self, llm: LLM, stop: list, gen: Generation, chat: bool, handle) -> None:
        self.llm, self.chat, self.handle, self.gen = llm, chat, handle, gen
        self.text = TextStream(llm.tokenizer, stop)
        self.parts: list = []
        self.logprobs: list = []
        self.generated = 0
        self.done = False
        self.finish_reason: Optional[str] = None

    def take(self, event: Event) -> tuple:
        """(new text, new logprob entries) for one event."""
        if self.done:
            return "", []
        if event.finish is not None:
            piece = self.text.finish()
            self.done = True
            self.finish_reason = "length" if event.finish == "length" else "stop"
            if piece:
                self.parts.append(piece)
            return piece, []
        self.generated += 1
        if event.token in self.llm.stop_token_ids:
            return "", []
        piece = self.text.push(event.token)
        entries = [self._logprob(event)] if event.logprob is not None else []
        self.logprobs.extend(entries)
        if piece:
            self.parts.append(piece)
        if self.text.stopped:   # a stop string: nothing more of this request is shown
            self.done, self.finish_reason = True, "stop"
            self.handle.cancel()
        return piece, entries

    def _logprob(self, event: Event) -> dict:
        tok = self.llm.tokenizer

        def entry(t, lp):
            raw = tok.token_to_bytes(int(t)) if t < tok.vocab_size else b""
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}
        out = entry(event.token, event.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in (event.top or [])]
        return out

    def response(self, ident: str, created: int, model: str, prompt_tokens: int, cached: int) -> dict:
        text = "".join(self.parts)
        usage = _usage(prompt_tokens, self.generated, cached)
        if self.chat:
            logprobs = {"content": self.logprobs} if self.gen.logprobs is not None else None
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": logprobs, "finish_reason": self.finish_reason}],
                    "usage": usage}
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": _completion_logprobs(self.logprobs)
                             if self.gen.logprobs is not None else None, "finish_reason": self.finish_reason}],
                "usage": usage}


def _completion_logprobs(entries: list) -> dict:
    """The legacy completions shape: parallel lists, and text offsets into the reply."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _chunk(ident, created, model, chat, content, finish, logprobs=None) -> dict:
    if chat:
        delta = content if isinstance(content, dict) else {"content": content}
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": content, "logprobs": _completion_logprobs(logprobs) if logprobs else None,
              "finish_reason": finish}
    return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---------------------------------------------------------------------------- the rest

async def _json(request: HttpRequest):
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}", None, "invalid_json") from None


def _check_model(service: Service, name: Optional[str]) -> None:
    if name is not None and name != service.name:
        raise ApiError(404, f"the model {name!r} does not exist (this server serves {service.name!r})", "model",
                       "model_not_found")


def _check_ids(llm: LLM, ids: list, param: str) -> None:
    V = llm.tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise ApiError(400, f"{param}: token ids must lie in [0, {V}), got {bad[0]}", param, "invalid_value")


def _model_card(service: Service) -> dict:
    return {"id": service.name, "object": "model", "created": int(service.started), "owned_by": "pyllm"}


def _embedding(model, ids: list) -> list:
    """The mean over positions of the last hidden state (after the final norm), scaled to length 1."""
    hidden = model.hidden_states(np.asarray([ids], np.int64))[0].astype(np.float64)
    vector = hidden.mean(axis=0)
    norm = np.linalg.norm(vector)
    return (vector / norm if norm > 0 else vector).tolist()


def _metrics(service: Service) -> str:
    """Prometheus's text format: each metric's HELP and TYPE, then its samples."""
    s = service.engine.stats if service.engine is not None else None
    lines: list = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP pyllm_{name} {help_text}", f"# TYPE pyllm_{name} {kind}"])
        lines.extend(f"pyllm_{name}{labels} {value}" for labels, value in samples)
    metric("up", "gauge", "1 once the model is loaded.", [("", int(s is not None))])
    metric("http_requests_total", "counter", "HTTP requests by route and status.",
           [(f'{{path="{path}",status="{status}"}}', n) for (path, status), n in sorted(service.http_requests.items())])
    if s is not None:
        for name, kind, help_text, value in (
                ("requests_total", "counter", "Generation requests submitted.", s.requests),
                ("requests_finished_total", "counter", "Generation requests finished.", s.finished),
                ("prompt_tokens_total", "counter", "Prompt tokens of the requests.", s.prompt_tokens),
                ("prompt_tokens_cached_total", "counter", "Prompt tokens taken from the prefix cache.",
                 s.cached_prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
                ("queue_length", "gauge", "Requests waiting for a slot.", s.queued),
                ("running_requests", "gauge", "Requests generating now.", s.running),
                ("decode_steps_total", "counter", "Batched decode steps.", s.steps),
                ("batch_size_mean", "gauge", "Mean rows per decode step.",
                 f"{s.batch_rows / s.steps:.3f}" if s.steps else 0),
                ("time_to_first_token_seconds_sum", "counter", "Seconds from submission to first token, summed.",
                 f"{s.first_token_seconds:.6f}"),
                ("time_to_first_token_seconds_count", "counter", "Requests that produced a first token.",
                 s.first_tokens)):
            metric(name, kind, help_text, [("", value)])
    return "\n".join(lines) + "\n"
