"""The OpenAI-compatible server behind `pudding serve`: /v1/completions, /v1/chat/completions (both streaming or
not), /v1/models and /health.

The engine is shared state (the running stack, the KV cache), so requests run one at a time on a single worker
thread while the event loop stays free to accept, validate, stream and refuse requests. At most `queue_size`
requests wait behind the running one; more are answered 503. Each request is routed once (or runs the set it forces
with the extra body field `pudding`), and its response says which blocks ran and how long routing, the block swap
and the first token took. Decoding is greedy whatever the sampling parameters say. Bad input gets a 4xx with an
OpenAI-style error body, never a 500 and never a dead server; a client that goes away mid-stream stops its
generation.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from . import __version__
from .errors import PuddingError
from .omission import OmissionSet

DECODING = "greedy: temperature, top_p and seed are accepted and ignored"
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_STOP_STRINGS = 4


# ------------------------------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(PuddingError)
    async def rejected(request: Request, error: PuddingError) -> JSONResponse:  # the engine refused the input
        return JSONResponse(error_body(str(error)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # OpenAI answers 400 invalid_request_error where FastAPI would answer 422 with its own body.
        return JSONResponse(_validation_body(error), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(error_body(str(error.detail), kind, None, code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:  # a bug: say so in the API's shape
        return JSONResponse(error_body(f"internal error ({type(error).__name__})", "server_error"), status_code=500)


def _validation_body(error: RequestValidationError) -> dict:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return error_body(f"the request body is not valid JSON ({reason})", param=None, code="invalid_json")
    param = _param_path(first["loc"], getattr(error, "body", None), first["type"] == "missing")
    where = f"'{param}'" if param else "the request body"
    return error_body(f"{where}: {first['msg'][0].lower()}{first['msg'][1:]}", param=param, code=first["type"])


def _param_path(loc: tuple, body, missing: bool) -> str | None:
    """The field an error is about, as 'messages[0].role': the part of pydantic's location that exists in the body
    (the rest names union members), plus the absent field itself when one is missing."""
    parts, node = [], body
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        present = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node))
        if not present:
            if missing and isinstance(part, str):
                parts.append(part)
            break
        parts.append(part)
        node = node[part]
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return text or None


# ------------------------------------------------------------------------------------------------------------------
# Requests


class PuddingOptions(BaseModel):
    """The extra body field that forces a set: {"set": 3}, {"set": "dense"} or {"omit": [11, 17]}."""

    model_config = ConfigDict(extra="forbid")
    set: StrictInt | Literal["dense"] | None = None
    omit: list[StrictInt] | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (top_p, seed, user, ...) are accepted and ignored
    model: StrictStr
    max_tokens: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: StrictInt = Field(1, ge=1, le=1)
    pudding: PuddingOptions | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


# ------------------------------------------------------------------------------------------------------------------
# Jobs on the engine thread


@dataclass(eq=False)  # kept in a set by identity
class Job:
    ids: list[int]
    route_text: str  # what the router reads: the prompt, or the last user message of a chat
    omit: OmissionSet | None  # None: the router chooses
    max_tokens: int
    stops: list[str]
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Outcome:
    generation: object  # runtime.Generation
    finish_reason: str | None  # None when cancelled
    queue_ms: float


class StopScanner:
    """Cuts generated text at the first stop string. It holds back a tail that could be the start of a stop string,
    so a streamed piece never shows text that a later token turns into a stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text now safe to show, and whether a stop string was reached."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            safe, self.pending = self.pending[: min(found)], ""
            return safe, True
        keep = self._partial_stop_length()
        safe, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def _partial_stop_length(self) -> int:
        """The longest tail of the pending text that is the start of a stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest


_FINISHED = object()


class Service:
    """One engine, one worker thread, a bounded queue; turns validated requests into jobs and jobs into text."""

    def __init__(self, engine, model_name: str, default_omit: OmissionSet | None, queue_size: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.default_omit = default_omit  # None: route every request
        self.queue_size = queue_size
        self.num_blocks = engine.shape.num_blocks
        self.sets: list[OmissionSet] = list(engine.router_sets)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pudding-engine")
        self._lock = threading.Lock()
        self._live: set[Job] = set()  # admitted and not finished: the running job and those waiting
        self.counts = {"completed": 0, "cancelled": 0, "refused": 0, "failed": 0}

    # -- validation -------------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def job(self, text: str, route_text: str, request: _Request, requested: int | None, default_max: int | None,
            param: str) -> Job:
        """Validate what every request shares: the set, the context, max_tokens, stop strings."""
        if not route_text.strip():
            raise ApiError(400, "the prompt is empty", param, "empty_prompt")
        omit = self._chosen_set(request.pudding)
        ids = self.engine.encode(text)
        return Job(ids, route_text, omit, self._max_tokens(len(ids), requested, default_max, param),
                   _stop_strings(request.stop))

    def _chosen_set(self, options: PuddingOptions | None) -> OmissionSet | None:
        if options is None or (options.set is None and options.omit is None):
            return self.default_omit
        if options.set is not None and options.omit is not None:
            raise ApiError(400, "give pudding.set or pudding.omit, not both", "pudding")
        if options.omit is not None:
            chosen = _omission_set(options.omit, self.num_blocks)
        elif options.set == "dense":
            chosen = OmissionSet.dense(self.num_blocks)
        elif not self.sets:
            raise ApiError(400, "this server has no router and so no numbered sets: force blocks with pudding.omit",
                           "pudding.set")
        elif not 0 <= options.set < len(self.sets):
            raise ApiError(400, f"set {options.set} does not exist: the router's sets are numbered 0 to "
                                f"{len(self.sets) - 1}", "pudding.set")
        else:
            chosen = self.sets[options.set]
        self._check_fits(chosen)
        return chosen

    def _check_fits(self, omit: OmissionSet) -> None:
        blocks = self.engine.blocks
        if blocks.mode == "budget" and self.num_blocks - len(omit) > blocks.capacity:
            raise ApiError(400, f"that set keeps {self.num_blocks - len(omit)} blocks but this server's memory budget "
                                f"holds {blocks.capacity}", "pudding")

    def _max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None, param: str) -> int:
        room = self.engine.max_len - prompt_tokens
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens, which leaves no room in this server's context "
                                f"of {self.engine.max_len} tokens", param, "context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if requested < 1:
            raise ApiError(400, f"max_tokens must be at least 1, not {requested}", "max_tokens", "invalid_value")
        if requested > room:
            raise ApiError(400, f"this server's context is {self.engine.max_len} tokens: the prompt takes "
                                f"{prompt_tokens} and max_tokens asks for {requested}", "max_tokens",
                           "context_length_exceeded")
        return requested

    def chat_text(self, messages: list[ChatMessage]) -> str:
        import jinja2

        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"{self.model_name} has no chat template: use /v1/completions", "messages")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError, TypeError) as err:
            raise ApiError(400, f"the model's chat template rejected these messages: {err}", "messages") from None

    # -- running ------------------------------------------------------------------------------------------------

    def start(self, job: Job) -> AsyncIterator[str | Outcome]:
        """Queue the job on the engine thread (or refuse it: 503 when the queue is full). The returned iterator
        yields its text pieces as they come, then its Outcome."""
        with self._lock:
            if len(self._live) > self.queue_size:  # one running, queue_size waiting
                self.counts["refused"] += 1
                raise ApiError(503, f"the server is busy: {self.queue_size} requests are already waiting",
                               None, "server_overloaded", "server_error")
            self._live.add(job)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        future = self._worker.submit(self._generate, job, put)
        future.add_done_callback(lambda done: (self._finished(job, done), put(_FINISHED)))
        return self._results(job, items, future)

    async def _results(self, job: Job, items: asyncio.Queue, future: Future) -> AsyncIterator[str | Outcome]:
        try:
            while (item := await items.get()) is not _FINISHED:
                yield item
            if future.cancelled() or future.result().generation is None:  # never ran: the server is stopping
                raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
            yield future.result()
        finally:
            job.cancelled.set()  # the consumer is gone (client disconnected): stop generating

    def _generate(self, job: Job, emit: Callable[[str], None]) -> Outcome:
        """On the engine thread: route (unless forced), swap, pre-fill, decode; emit text as it becomes safe."""
        queue_ms = 1000 * (time.perf_counter() - job.queued_at)
        scanner = StopScanner(job.stops)
        result, finish = None, None
        if not job.cancelled.is_set():
            for piece, result in self.engine.stream(job.ids, job.omit, job.max_tokens, route_text=job.route_text):
                if job.cancelled.is_set():
                    break
                text, stopped = scanner.feed(piece)
                if text:
                    emit(text)
                if stopped:
                    finish = "stop"
                    break
            else:
                rest = scanner.flush()
                if rest:
                    emit(rest)
                finish = result.finish_reason
        return Outcome(result, finish, queue_ms)

    def _finished(self, job: Job, future: Future) -> None:
        with self._lock:
            self._live.discard(job)
            if future.cancelled():  # never started: the server is stopping
                self.counts["cancelled"] += 1
            elif future.exception() is not None:
                self.counts["failed"] += 1
            else:
                self.counts["completed" if future.result().finish_reason else "cancelled"] += 1

    def close(self) -> None:
        with self._lock:
            for job in self._live:
                job.cancelled.set()
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- describing -----------------------------------------------------------------------------------------------

    def pudding_field(self, outcome: Outcome) -> dict:
        generation = outcome.generation
        t = generation.timings
        blocks = OmissionSet(generation.blocks, self.num_blocks)
        routed = generation.set_index is not None  # the engine gives a set index only when its router chose
        index = generation.set_index if routed else (self.sets.index(blocks) if blocks in self.sets else None)
        return {"set_index": index, "omitted_blocks": list(blocks), "routed": routed,
                "router_ms": round(t.route_ms, 3), "swap_ms": round(t.swap_ms, 3), "ttft_ms": round(t.ttft_ms, 3),
                "queue_ms": round(outcome.queue_ms, 3), "tokens_per_second": round(t.tokens_per_second, 2)}

    def health(self) -> dict:
        with self._lock:
            live = len(self._live)
            counts = dict(self.counts)
        return {"status": "ok", "model": self.model_name, "routed": self.default_omit is None,
                "busy": live > 0, "waiting": max(0, live - 1), "queue_size": self.queue_size, "requests": counts}


def _omission_set(blocks: list[int], num_blocks: int) -> OmissionSet:
    try:
        return OmissionSet(blocks, num_blocks)
    except PuddingError as err:
        raise ApiError(400, str(err), "pudding.omit") from None


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "a stop string is empty", "stop")
    return stops


# ------------------------------------------------------------------------------------------------------------------
# Responses


class _Envelope:
    """The fixed parts of one response (id, object, created, model) for the completions or the chat endpoint."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model}

    def full(self, text: str, finish: str | None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.base, "object": "chat.completion" if self.chat else "text_completion", "choices": [choice]}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.base, "object": self.chunk_object, "choices": [choice]}


def _usage(outcome: Outcome) -> dict:
    generation = outcome.generation
    completion = len(generation.tokens)
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion,
            "total_tokens": generation.prompt_tokens + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _CancellingStream(StreamingResponse):
    """A streamed response that cancels its job however the response ends (done, client gone, server stopping)."""

    def __init__(self, content, job: Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()


async def _respond(service: Service, request: _Request, job: Job, chat: bool):
    results = service.start(job)
    envelope = _Envelope(chat, service.model_name)
    if request.stream:
        usage = bool(request.stream_options and request.stream_options.include_usage)
        return _CancellingStream(_events(service, results, envelope, usage), job)
    pieces = []
    async for item in results:
        if isinstance(item, Outcome):
            return {**envelope.full("".join(pieces), item.finish_reason), "usage": _usage(item),
                    "pudding": service.pudding_field(item)}
        pieces.append(item)


async def _events(service: Service, results: AsyncIterator, envelope: _Envelope,
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}  # as OpenAI: null on every chunk but the last
    if envelope.chat:
        yield _sse({**envelope.chunk(None, first=True), **extra})
    try:
        async for item in results:
            if isinstance(item, Outcome):
                outcome = item
            else:
                yield _sse({**envelope.chunk(item), **extra})
    except (PuddingError, ApiError) as err:  # headers are sent: report the failure in the stream
        yield _sse(err.body() if isinstance(err, ApiError) else error_body(str(err)))
        yield _sse("[DONE]")
        return
    yield _sse({**envelope.chunk(None, outcome.finish_reason), **extra,
                "pudding": service.pudding_field(outcome)})
    if include_usage:
        yield _sse({**envelope.base, "object": envelope.chunk_object, "choices": [], "usage": _usage(outcome)})
    yield _sse("[DONE]")


# ------------------------------------------------------------------------------------------------------------------
# The app


def create_app(engine, model_name: str, default_omit: OmissionSet | None = None, queue_size: int = 16) -> FastAPI:
    """The HTTP app around an engine. With default_omit None the engine must have a router: each request is routed."""
    if default_omit is None and engine.router is None:
        raise PuddingError("an engine without a router needs a fixed omission set to serve")
    service = Service(engine, model_name, default_omit, queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="pudding", version=__version__, lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "pudding",
            "pudding": {"routed": default_omit is None, "sets": [list(s) for s in service.sets],
                        "default_omit": None if default_omit is None else list(default_omit),
                        "num_blocks": service.num_blocks, "context": engine.max_len, "decoding": DECODING},
        }]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        service.check_model(request.model)
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"this server takes one prompt per request, not {len(prompt)}", "prompt")
            prompt = prompt[0]
        job = service.job(prompt, prompt, request, request.max_tokens, COMPLETION_MAX_TOKENS, "prompt")
        return await _respond(service, request, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        service.check_model(request.model)
        users = [m.text() for m in request.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "the messages hold no user message", "messages")
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        # The router was trained on task prompts, so it reads the last user message rather than the whole template.
        job = service.job(service.chat_text(request.messages), users[-1], request, requested, None, "messages")
        return await _respond(service, request, job, chat=True)

    return app


def check_port(host: str, port: int) -> None:
    """Fail early, before the model loads, when the address cannot be bound."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise PuddingError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(engine, model_name: str, default_omit: OmissionSet | None, host: str, port: int, queue_size: int) -> None:
    import uvicorn

    app = create_app(engine, model_name, default_omit, queue_size)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


class ServerProcess:
    """`pudding serve ARGS` in a child process on a free loopback port, ready once /health answers (for the tests
    and the load test, which talk to the server as any client would)."""

    def __init__(self, args: list[str], log_path, start_timeout: float = 180) -> None:
        import subprocess
        import sys

        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._http = httpx.Client(timeout=10)
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "pudding.cli", "serve", *args, "--port", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise PuddingError(f"the server did not start; its log ends with:\n{tail}")
            time.sleep(0.5)

    def healthy(self) -> bool:
        import httpx

        try:
            return self.health()["status"] == "ok"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def health(self) -> dict:
        return self._http.get(f"{self.url}/health").json()

    def stop(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._http.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
