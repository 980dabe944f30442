"""The HTTP app: /v1/completions, /v1/chat/completions (both streaming or not), /v1/models and /health.

Decoding is greedy whatever the sampling parameters say. Bad input gets a 4xx with an OpenAI-style error body,
never a 500 and never a dead server; a client that goes away mid-stream stops its generation.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import PuddingError
from ..policy import Policy
from .service import Job, Outcome, Service
from .wire import (
    COMPLETION_MAX_TOKENS, ApiError, ChatRequest, CompletionRequest, Envelope, OpenAIRequest, error_body, sse, usage,
    validation_body,
)

DECODING = "greedy: temperature, top_p and seed are accepted and ignored"


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
        return JSONResponse(validation_body(error), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 413: "request_too_large"}.get(error.status_code)
        return JSONResponse(error_body(str(error.detail), kind, None, code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:  # a bug: say so in the API's shape
        request.app.state.service.count("failed")
        return JSONResponse(error_body(f"internal error ({type(error).__name__})", "server_error"), status_code=500)


class BodyLimit:
    """Refuses a request body larger than `limit` bytes with 413, before it is read whole: one huge request must not
    take the server's memory or its event loop."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, _TooLarge(int(declared), self.limit))
        seen = 0

        async def counted():  # a body sent in chunks, without a length: counted as it arrives
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen, self.limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge as refused:  # raised where no handler answered it
            await self._refuse(send, refused)

    @staticmethod
    async def _refuse(send, refused: _TooLarge) -> None:
        body = error_body(refused.detail, param=None, code="request_too_large")
        await JSONResponse(body, status_code=413)({"type": "http"}, None, send)


class _TooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes an HTTPException through its body parsing to the handlers."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(413, f"the request body ({size} bytes or more) is larger than this server accepts "
                              f"({limit} bytes: pudding serve --max-body-mb)")


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


async def _respond(service: Service, request: OpenAIRequest, jobs: list[Job], chat: bool, http: Request,
                   texts: list[str] | None = None):
    """Stream one job's text, or run the jobs (one per prompt) and answer with every choice at once. A client that
    goes away stops its jobs, streamed or not."""
    envelope = Envelope(chat, service.model_name)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _CancellingStream(_events(service, service.start(jobs[0]), envelope, include_usage), jobs[0])
    watcher = asyncio.create_task(_cancel_when_gone(http, jobs))
    try:
        outcomes = []
        for job in jobs:
            pieces = []
            async for item in service.start(job):
                if isinstance(item, Outcome):
                    outcomes.append((job, "".join(pieces), item))
                else:
                    pieces.append(item)
    finally:
        watcher.cancel()
    choices = [envelope.choice(i, (texts[i] if texts else "") + text, outcome.finish_reason,
                               service.logprobs(job, outcome, chat))
               for i, (job, text, outcome) in enumerate(outcomes)]
    return {**envelope.full(choices), "usage": usage([o.generation for _, _, o in outcomes]),
            "pudding": service.pudding_field(outcomes[0][2]) if len(outcomes) == 1 else
            [service.pudding_field(o) for _, _, o in outcomes]}


async def _cancel_when_gone(http: Request, jobs: list[Job]) -> None:
    """Polls the connection of a request whose answer is not streamed: nobody waits for it once the client left."""
    while True:
        if await http.is_disconnected():
            for job in jobs:
                job.cancelled.set()
            return
        await asyncio.sleep(0.1)


async def _events(service: Service, results: AsyncIterator, envelope: Envelope,
                  include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}  # as OpenAI: null on every chunk but the last
    if envelope.chat:
        yield sse({**envelope.chunk(None, first=True), **extra})
    try:
        async for item in results:
            if isinstance(item, Outcome):
                outcome = item
            else:
                yield sse({**envelope.chunk(item), **extra})
    except (PuddingError, ApiError) as err:  # headers are sent: report the failure in the stream
        yield sse(err.body() if isinstance(err, ApiError) else error_body(str(err)))
        yield sse("[DONE]")
        return
    yield sse({**envelope.chunk(None, outcome.finish_reason), **extra,
                "pudding": service.pudding_field(outcome)})
    if include_usage:
        yield sse({**envelope.base, "object": envelope.chunk_object, "choices": [], "usage": usage([outcome.generation])})
    yield sse("[DONE]")


async def _read(http: Request, model: type[OpenAIRequest], service: Service) -> OpenAIRequest:
    """The request body, parsed and validated on a worker thread: a body of megabytes takes a while to check, and
    the event loop must keep answering /health and the other clients meanwhile."""
    kind = http.headers.get("content-type", "")
    if "json" not in kind.lower():
        said = f"'{kind}'" if kind else "no Content-Type"
        raise ApiError(400, f"the request body must be JSON, sent with the header Content-Type: application/json "
                            f"(this request has {said})", None, "invalid_content_type")
    return await asyncio.to_thread(_validated, model, await http.body(), service)


def _validated(model: type[OpenAIRequest], body: bytes, service: Service) -> OpenAIRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", None, "invalid_json") from None
    # Token ids beyond the context are refused before validation, which holds the interpreter lock throughout
    # (a second for a few million ids) and so would stall the event loop.
    prompt = data.get("prompt") if isinstance(data, dict) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        service.check_length(len(prompt))
    elif isinstance(prompt, list):
        for i, item in enumerate(prompt):
            if isinstance(item, list):
                service.check_length(len(item), f"prompt[{i}]")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors(), body=data) from None


# ------------------------------------------------------------------------------------------------------------------
# The app


def create_app(engine, policy: Policy, model_name: str, queue_size: int = 16, max_body_mb: float = 4.0) -> FastAPI:
    """The HTTP app around an engine; the policy chooses each request's set (a router, or one fixed set)."""
    service = Service(engine, policy, model_name, queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="pudding", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=int(max_body_mb * 1e6))
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "pudding",
            "pudding": {"routed": policy.fixed is None, "sets": [list(s) for s in service.sets],
                        "default_omit": None if policy.fixed is None else list(policy.fixed),
                        "num_blocks": service.num_blocks, "context": engine.max_len, "decoding": DECODING},
        }]}

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(http: Request):
        request = await _read(http, CompletionRequest, service)
        service.check_model(request.model)
        request.refuse_unsupported()
        prompts = request.prompts()
        if not prompts:
            raise ApiError(400, "the prompt is empty", "prompt", "empty_prompt")
        if request.stream and (len(prompts) > 1 or request.echo or request.logprobs is not None):
            raise ApiError(400, "stream: true takes one prompt, without echo or logprobs", "stream")
        jobs = [await asyncio.to_thread(service.job, prompt, prompt if isinstance(prompt, str) else None, request,
                                        request.max_tokens, COMPLETION_MAX_TOKENS, "prompt", request.logprobs,
                                        request.echo)
                for prompt in prompts]
        texts = [await asyncio.to_thread(service.prompt_text, p) for p in prompts] if request.echo else None
        return await _respond(service, request, jobs, False, http, texts)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatRequest))
    async def chat_completions(http: Request):
        request = await _read(http, ChatRequest, service)
        service.check_model(request.model)
        request.refuse_unsupported()
        if request.stream and request.logprobs:
            raise ApiError(400, "stream: true does not carry logprobs here", "stream")
        users = [m.text() for m in request.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "the messages hold no user message", "messages")
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        text = await asyncio.to_thread(service.chat_text, request.messages)
        # The router was trained on task prompts, so it reads the last user message rather than the whole template.
        job = await asyncio.to_thread(service.job, text, users[-1], request, requested, None, "messages", logprobs)
        return await _respond(service, request, [job], True, http)

    return app


def _body_schema(model: type[OpenAIRequest]) -> dict:
    """The request body in the OpenAPI description (/docs), since the endpoints read their bodies themselves."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def check_port(host: str, port: int) -> None:
    """Fail early, before the model loads, when the address cannot be bound."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise PuddingError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(engine, policy: Policy, model_name: str, host: str, port: int, queue_size: int, max_body_mb: float = 4.0) -> None:
    import uvicorn

    app = create_app(engine, policy, model_name, queue_size, max_body_mb)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
