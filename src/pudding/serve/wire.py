"""The OpenAI wire format: request bodies as pydantic models (strict types, OpenAI's defaults), error bodies in
OpenAI's shape, and the response envelopes of /v1/completions and /v1/chat/completions, whole or as SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_STOP_STRINGS = 4


# ------------------------------------------------------------------------------------------------------------------
# Errors


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


def validation_body(error: RequestValidationError) -> dict:
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


class OpenAIRequest(BaseModel):
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


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr | list[StrictStr]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


# ------------------------------------------------------------------------------------------------------------------
# Responses


class Envelope:
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


def usage(generation) -> dict:
    """OpenAI's token counts of a finished generation (`engine.Generation`)."""
    completion = len(generation.tokens)
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion,
            "total_tokens": generation.prompt_tokens + completion}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
