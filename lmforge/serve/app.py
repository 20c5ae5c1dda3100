"""The HTTP API: OpenAI's chat completions, completions and models routes, with server-sent-event streaming,
over a `Batcher`; /health, /metrics (Prometheus text) and the chat page at /.

FastAPI (routes, request validation by pydantic) and uvicorn (HTTP, graceful shutdown on SIGTERM) do the
web part; prometheus_client writes the metrics; nothing here parses HTTP by hand. Errors have OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; a user's bad input is a 4xx, never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.generate import GenerationConfig
from lmforge.serve.batcher import Batcher, Event, QueueFull, Stopped
from lmforge.serve.batcher import Request as Job

log = logging.getLogger("lmforge.serve")
PAGE = Path(__file__).with_name("page.html")
OPEN_PATHS = {"/", "/health", "/favicon.ico"}  # no key needed: the page is static, health says only "ok"
API_KEY_ENV = "LMFORGE_API_KEY"


# ---- errors ----------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(e: RequestValidationError) -> APIError:
    """pydantic's first complaint as one line naming the field: 'temperature: Input should be ...'."""
    first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else f"the body must be a JSON object: {first['msg']}"
    more = len(e.errors()) - 1
    return APIError(400, message + (f" (and {more} more)" if more else ""), param=param)


# ---- requests (unknown fields are ignored, as OpenAI clients send fields of newer API versions) ------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # beyond OpenAI's fields, as vLLM and llama.cpp take them
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False  # as vLLM's: replies of exactly max_tokens (benchmarks)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ---- metrics ---------------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus series of one server (its own registry: two servers in one process stay apart)."""

    def __init__(self, batcher: Batcher) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens generated", registry=r)
        self.finished = Counter("lmforge_finished", "generations (choices) ended, by finish reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "a request's time per token after the first",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        Gauge("lmforge_queue_depth", "requests waiting for a free slot", registry=r).set_function(
            lambda: batcher.queue_depth)
        Gauge("lmforge_active_slots", "slots generating now", registry=r).set_function(lambda: batcher.busy)
        Gauge("lmforge_slots", "slots (requests decoded together)", registry=r).set(batcher.slots)
        Gauge("lmforge_tokens_per_second", "tokens generated per second over the last 10 s", registry=r
              ).set_function(self.tokens_per_second)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s

    def generated(self, n: int) -> None:
        self.completion_tokens.inc(n)
        now = time.monotonic()
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - 10:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self.recent if t >= now - 10) / 10


# ---- one HTTP request's generations ---------------------------------------------------------------------


@dataclass
class Choice:
    index: int
    prompt_len: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    first: float | None = None


class Generations:
    """The choices of one HTTP request (prompts x n), submitted together; their events arrive on one asyncio
    queue as (choice index, Event), handed over from the batcher's thread."""

    def __init__(self, state: ServerState, prompts: Sequence[list[int]], n: int, config: GenerationConfig,
                 logprobs: int | None, ignore_eos: bool = False) -> None:
        self.state, self.started = state, time.perf_counter()
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.choices = [Choice(i * n + j, len(p)) for i, p in enumerate(prompts) for j in range(n)]
        self.jobs = []
        for c in self.choices:
            seed = config.seed
            # n seeded choices differ from each other: choice j samples with seed + j
            cfg = config if seed is None or n == 1 else dataclasses.replace(config, seed=seed + c.index % n)
            self.jobs.append(Job(prompts[c.index // n], cfg, self._emitter(loop, c.index), logprobs=logprobs,
                                 ignore_eos=ignore_eos))
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.sources: list[dict[str, Any]] | None = None  # --rag: what the answer was given

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int):
        def emit(event: Event) -> None:  # on the batcher's thread
            if event.finish_reason is not None:  # counted here: a client that left reads no more events
                self.state.metrics.finished.labels(event.finish_reason).inc()
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return emit

    def submit(self) -> None:
        try:
            self.state.batcher.submit_all(self.jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except Stopped as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None
        except ValueError as e:  # checked before (_generations): an empty or too long prompt
            raise APIError(400, str(e)) from None
        self.state.metrics.prompt_tokens.inc(self.prompt_tokens)

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.cancelled:
                self.state.batcher.cancel(job)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    async def events(self, request: Request) -> AsyncIterator[tuple[Choice, Event]]:
        """Each event as it comes, applied to its choice, until every choice ended. The client leaving
        (checked every half second, also while tokens flow) cancels every choice."""
        checked = time.monotonic()
        try:
            while not self.done:
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
                    item = None
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is None:
                    continue
                index, event = item
                c = self.choices[index]
                self._apply(c, event)
                yield c, event
        finally:
            self.cancel()  # a no-op for choices that ended; frees the slots of the others

    def _apply(self, c: Choice, event: Event) -> None:
        now = time.perf_counter()
        m = self.state.metrics
        if event.token is not None or event.text:
            if c.first is None:
                c.first = now
                m.ttft.observe(now - self.started)
        generated = event.completion_tokens - c.completion_tokens
        if generated > 0:
            m.generated(generated)
        c.completion_tokens = max(c.completion_tokens, event.completion_tokens)
        c.text += event.text
        if event.token is not None:
            c.tokens.append(event.token)
            if event.logprob is not None:
                c.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            c.finish_reason, c.error = event.finish_reason, event.error
            if c.first is not None and c.completion_tokens > 1:
                m.tpot.observe((now - c.first) / (c.completion_tokens - 1))


# ---- the server ------------------------------------------------------------------------------------------


@dataclass
class Retrieval:
    """--rag: chat answers grounded in a `lmforge.rag.Index`; the sources go back with the answer."""

    index: Any
    k: int = 3
    mode: str = "hybrid"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def search(self, question: str) -> list[Any]:
        with self.lock:  # one search at a time: the embedding model and the SQLite connection are shared
            return self.index.search(question, self.k, self.mode)


@dataclass
class ServerState:
    batcher: Batcher
    tokenizer: Any
    model_name: str
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    rag: Retrieval | None = None


def create_app(model: Any, tokenizer: Any, model_name: str, *, api_key: str | None = None, slots: int = 8,
               context: int | None = None, max_waiting: int = 64, rag: Retrieval | None = None) -> FastAPI:
    """The ASGI app serving `model` as `model_name`. The batcher's thread starts with the app (lifespan) and
    stops after the last request ended (uvicorn waits for in-flight requests on SIGTERM first). `rag`: chat
    completions retrieve sources for the last user message and answer from them (returned as `sources`)."""
    prometheus_client.disable_created_metrics()  # no *_created series (process-wide; they only add noise)
    batcher = Batcher(model, tokenizer, slots=slots, context=context, max_waiting=max_waiting)
    state = ServerState(batcher, tokenizer, model_name, Metrics(batcher), rag=rag)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    if api_key:
        app.add_middleware(KeyCheck, key=api_key)
    app.add_middleware(Counting, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return APIError(e.status_code, message, type=kind).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # logged here, never sent
        log.exception("unexpected error")
        return APIError(500, "internal server error", type="server_error").response()

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name, "slots": batcher.slots, "busy": batcher.busy,
                "waiting": batcher.queue_depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        _check_model(state, name)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        _check_model(state, body.model)
        turns = _turns(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sources = None
        if state.rag is not None and turns[-1]["role"] == "user":
            hits = await asyncio.to_thread(state.rag.search, turns[-1]["content"])
            prompt, hits = _rag_prompt(state, turns, hits, max_tokens)
            sources = [_source(i, h) for i, h in enumerate(hits, 1)]
        else:
            prompt = _chat_prompt(state.tokenizer, turns)
        top = body.top_logprobs or 0
        gen = _generations(state, [prompt], body, max_tokens, top if body.logprobs else None, chat=True)
        gen.sources = sources
        if body.stream:
            return _sse(_chat_chunks(state, gen, body, request))
        return await _chat_response(state, gen, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(state, body.model)
        for name, bad in (("echo", body.echo), ("suffix", body.suffix), ("best_of", (body.best_of or 1) > 1)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported")
        prompts = _completion_prompts(state.tokenizer, body.prompt, batcher.model.config.vocab_size)
        gen = _generations(state, prompts, body, body.max_tokens, body.logprobs, chat=False)
        if body.stream:
            return _sse(_completion_chunks(state, gen, body, request))
        return await _completion_response(state, gen, body, request)

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmforge",
            "max_model_len": state.batcher.context}


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{state.model_name}'",
                       type="not_found_error", param="model", code="model_not_found")


def _turns(messages: list[Message]) -> list[dict[str, str]]:
    """The messages as the chat template takes them: text content, `developer` as `system`."""
    turns = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return turns


@contextlib.contextmanager
def _template_errors() -> Iterator[None]:
    try:
        yield
    except jinja2.TemplateError as e:  # the model's template refuses these messages (e.g. roles out of order)
        raise APIError(400, f"the model's chat template refuses these messages: {e}", param="messages") from None
    except ValueError as e:  # e.g. undecodable text
        raise APIError(400, str(e), param="messages") from None


def _chat_prompt(tokenizer: Any, turns: list[dict[str, str]]) -> list[int]:
    with _template_errors():
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)


def _rag_prompt(state: ServerState, turns: list[dict[str, str]], hits: list[Any], max_tokens: int | None
                ) -> tuple[list[int], list[Any]]:
    """The prompt with `hits` as numbered sources (`rag.answers.fit_prompt`: the oldest turns, then the least
    relevant sources are dropped to leave room for the answer) and the sources kept."""
    from lmforge.rag.answers import fit_prompt

    context = state.batcher.context
    with _template_errors():
        ids, kept, _ = fit_prompt(state.tokenizer, turns, hits, context, reserve=min(max_tokens or context, context // 2))
    return ids, kept


def _source(number: int, hit: Any) -> dict[str, Any]:
    """A retrieved chunk as the response names it: [number] in the prompt, where it is from, its text."""
    return {"index": number, "source": hit.source, "location": hit.location, "heading": hit.heading,
            "chunk": hit.chunk, "score": hit.score, "cite": hit.cite(), "text": hit.text}


def _completion_prompts(tokenizer: Any, prompt: Any, vocab: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for p in prompts:
        try:
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        if not ids:
            raise APIError(400, "the prompt has no tokens", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        out.append(ids)
    return out


def _generations(state: ServerState, prompts: list[list[int]], body: _Sampling, max_tokens: int | None,
                 logprobs: int | None, chat: bool) -> Generations:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server (repetition_penalty is)", param=name,
                           code="unsupported")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(s == "" for s in stops) or len(stops) > 4:
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    longest = max(len(p) for p in prompts)
    context = state.batcher.context
    if longest >= context:
        raise APIError(400, f"the prompt has {longest} tokens but the context is {context} tokens (prompt and "
                            "reply together)", param="messages" if chat else "prompt", code="context_length_exceeded")
    config = GenerationConfig(max_new_tokens=max_tokens or context, temperature=body.temperature,
                              top_k=body.top_k, top_p=None if body.top_p >= 1 else body.top_p, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, stop_strings=stops)
    gen = Generations(state, prompts, body.n, config, logprobs, body.ignore_eos)
    gen.submit()
    return gen


def _usage(gen: Generations) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in gen.choices)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion,
            "total_tokens": gen.prompt_tokens + completion}


def _failed(gen: Generations) -> APIError | None:
    """The error to answer when a choice did not end normally (server shutting down, generation failed)."""
    for c in gen.choices:
        if c.finish_reason == "error":
            return APIError(500, c.error or "generation failed", type="server_error")
        if c.finish_reason == "cancelled":
            return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    return None


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


async def _collect(gen: Generations, request: Request) -> None:
    async for _ in gen.events(request):
        pass


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token])


def _chat_logprobs(tokenizer: Any, items: list[Any]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in items]}


def _completion_logprobs(tokenizer: Any, items: list[Any]) -> dict[str, Any]:
    tokens = [_token_text(tokenizer, lp.token) for lp in items]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in items],
            "text_offset": offsets}


async def _chat_response(state: ServerState, gen: Generations, body: ChatRequest, request: Request) -> Any:
    await _collect(gen, request)
    if (err := _failed(gen)) is not None:
        raise err
    rid, created = _ids("chatcmpl")
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(state.tokenizer, c.logprobs) if body.logprobs else None,
                "finish_reason": c.finish_reason} for c in gen.choices]
    out = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
           "choices": choices, "usage": _usage(gen), "system_fingerprint": None}
    return out if gen.sources is None else {**out, "sources": gen.sources}


async def _completion_response(state: ServerState, gen: Generations, body: CompletionRequest,
                               request: Request) -> Any:
    await _collect(gen, request)
    if (err := _failed(gen)) is not None:
        raise err
    rid, created = _ids("cmpl")
    choices = [{"index": c.index, "text": c.text,
                "logprobs": _completion_logprobs(state.tokenizer, c.logprobs) if body.logprobs is not None else None,
                "finish_reason": c.finish_reason} for c in gen.choices]
    return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "choices": choices, "usage": _usage(gen), "system_fingerprint": None}


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chunks(state: ServerState, gen: Generations, body: _Sampling, request: Request, kind: str,
                  piece: Any, first: Any = None) -> AsyncIterator[dict[str, Any]]:
    """The stream of one request: `first(choice)` once per choice (chat's role delta), then `piece(choice,
    event)` per event with something to say, the finishing chunks, the usage chunk when asked for, and an
    error object if generation failed."""
    rid, created = _ids("chatcmpl" if kind == "chat.completion.chunk" else "cmpl")
    usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": rid, "object": kind, "created": created, "model": state.model_name, "choices": choices,
               "system_fingerprint": None}
        return {**out, "usage": None} if usage else out

    if first is not None:  # with --rag, the first chunk carries the sources
        opening = chunk([first(c) for c in gen.choices])
        yield opening if gen.sources is None else {**opening, "sources": gen.sources}
    async for c, event in gen.events(request):
        if event.finish_reason in ("error", "cancelled"):
            err = _failed(gen)
            yield err.body()
            return
        if event.text or event.logprob is not None or event.finish_reason is not None:
            yield chunk([piece(c, event)])
    if usage and gen.done:
        yield {**chunk([]), "usage": _usage(gen)}


def _chat_chunks(state: ServerState, gen: Generations, body: ChatRequest, request: Request
                 ) -> AsyncIterator[dict[str, Any]]:
    def first(c: Choice) -> dict[str, Any]:
        return {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def piece(c: Choice, e: Event) -> dict[str, Any]:
        logprobs = _chat_logprobs(state.tokenizer, [e.logprob]) if body.logprobs and e.logprob else None
        delta = {"content": e.text} if e.text or e.finish_reason is None else {}
        return {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": e.finish_reason}

    return _chunks(state, gen, body, request, "chat.completion.chunk", piece, first)


def _completion_chunks(state: ServerState, gen: Generations, body: CompletionRequest, request: Request
                       ) -> AsyncIterator[dict[str, Any]]:
    def piece(c: Choice, e: Event) -> dict[str, Any]:
        logprobs = (_completion_logprobs(state.tokenizer, [e.logprob])
                    if body.logprobs is not None and e.logprob else None)
        return {"index": c.index, "text": e.text, "logprobs": logprobs, "finish_reason": e.finish_reason}

    return _chunks(state, gen, body, request, "text_completion", piece)


# ---- ASGI middleware (plain ASGI, not BaseHTTPMiddleware: streaming and disconnects pass through as they are)


class KeyCheck:
    """Every path but the page and /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if not auth:
                err = APIError(401, "no API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                err = APIError(401, "incorrect API key", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class Counting:
    """Counts each HTTP request by route and status for /metrics."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            route = path if path in self.ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.requests.labels(route, str(status["code"])).inc()


# ---- running it --------------------------------------------------------------------------------------------


def serve(model: Any, tokenizer: Any, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, slots: int = 8, context: int | None = 2048, max_waiting: int = 64,
          shutdown_timeout: float = 30.0, rag: Retrieval | None = None) -> None:
    """Serves `model` until SIGTERM / Ctrl-C: then in-flight requests finish (for up to `shutdown_timeout`
    seconds; after that they end with a clean error) and the process exits. `api_key` defaults to the
    LMFORGE_API_KEY environment variable."""
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(model, tokenizer, model_name, api_key=key, slots=slots, context=context,
                     max_waiting=max_waiting, rag=rag)
    ctx = app.state.lmforge.batcher.context
    print(f"serving {model_name} ({ctx} tokens of context, {slots} slots) on http://{host}:{port}/"
          f"{'  (API key required)' if key else ''}{f'  (answers from {rag.index.path})' if rag else ''}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
