"""The HTTP app: /v1/completions, /v1/chat/completions (both streaming or not), /v1/models and /health.

Decoding is greedy whatever the sampling parameters say. Bad input gets a 4xx with an OpenAI-style error body,
never a 500 and never a dead server; a client that goes away mid-stream stops its generation.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
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
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(error_body(str(error.detail), kind, None, code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:  # a bug: say so in the API's shape
        return JSONResponse(error_body(f"internal error ({type(error).__name__})", "server_error"), status_code=500)


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


async def _respond(service: Service, request: OpenAIRequest, job: Job, chat: bool):
    results = service.start(job)
    envelope = Envelope(chat, service.model_name)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return _CancellingStream(_events(service, results, envelope, include_usage), job)
    pieces = []
    async for item in results:
        if isinstance(item, Outcome):
            return {**envelope.full("".join(pieces), item.finish_reason), "usage": usage(item.generation),
                    "pudding": service.pudding_field(item)}
        pieces.append(item)


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
        yield sse({**envelope.base, "object": envelope.chunk_object, "choices": [], "usage": usage(outcome.generation)})
    yield sse("[DONE]")


# ------------------------------------------------------------------------------------------------------------------
# The app


def create_app(engine, policy: Policy, model_name: str, queue_size: int = 16) -> FastAPI:
    """The HTTP app around an engine; the policy chooses each request's set (a router, or one fixed set)."""
    service = Service(engine, policy, model_name, queue_size)

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
            "pudding": {"routed": policy.fixed is None, "sets": [list(s) for s in service.sets],
                        "default_omit": None if policy.fixed is None else list(policy.fixed),
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


def serve(engine, policy: Policy, model_name: str, host: str, port: int, queue_size: int) -> None:
    import uvicorn

    app = create_app(engine, policy, model_name, queue_size)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
