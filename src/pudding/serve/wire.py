"""The OpenAI wire format: request bodies as pydantic models (strict types, OpenAI's defaults), error bodies in
OpenAI's shape, and the response envelopes of /v1/completions and /v1/chat/completions, whole or as SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

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
    if first["type"] == "invalid_text":  # says which field itself
        return error_body(first["msg"], param=first["ctx"]["param"], code="invalid_text")
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


_SCALARS = (int, float, bool, type(None))


def lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string (key or value, at any depth) that is not valid text: JSON can escape half of a
    UTF-16 surrogate pair, which Python keeps as a lone surrogate and no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the request body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if type(item) in _SCALARS and type(key) is int:  # the bulk of a list of token ids
            continue
        # A key is named with its bad characters escaped: the error body must itself be valid text.
        name = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{name}".lstrip(".")
        found = lone_surrogate(key, where) if isinstance(key, str) else None
        found = found or lone_surrogate(item, where)
        if found:
            return found
    return None


# Parameters OpenAI defines that this server does not honour, with the values that ask for nothing (accepted)
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}


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

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        where = lone_surrogate(data)
        if where:
            raise PydanticCustomError("invalid_text", "'{param}' is not valid text: it holds a lone UTF-16 surrogate "
                                      "(\\ud800-\\udfff)", {"param": where})
        return data

    def refuse_unsupported(self) -> None:
        """A parameter that would change the answer and is not implemented is refused, never silently ignored."""
        for name, neutral in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                raise ApiError(400, f"'{name}' is not supported by this server (greedy decoding of plain text, one "
                                    "completion per prompt)", name, "unsupported_parameter")


class CompletionRequest(OpenAIRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]  # text or token ids, one or several
    echo: StrictBool = False  # the prompt comes back before the completion (with its log-probabilities)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)  # log-probability of each token, and this many alternatives

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(x, int) for x in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


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
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


# ------------------------------------------------------------------------------------------------------------------
# Responses


class Envelope:
    """The fixed parts of one response (id, object, created, model) for the completions or the chat endpoint."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model}

    def full(self, choices: list[dict]) -> dict:
        return {**self.base, "object": "chat.completion" if self.chat else "text_completion", "choices": choices}

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.base, "object": self.chunk_object, "choices": [choice]}


def usage(generations) -> dict:
    """OpenAI's token counts of finished generations (`engine.Generation`)."""
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(len(g.tokens) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(piece, prompt_ids: list[int] | None, prompt_scores, generation) -> dict:
    """The `logprobs` of a /v1/completions choice (OpenAI's legacy shape): the echoed prompt's tokens first (the
    first has no log-probability), then the generated ones. `piece` turns a token id into its text."""
    tokens, token_logprobs, top_logprobs = [], [], []
    if prompt_ids is not None:
        scores, tops = prompt_scores
        for i, token in enumerate(prompt_ids):
            tokens.append(piece(token))
            token_logprobs.append(scores[i])
            top_logprobs.append(None if i == 0 else {piece(t): lp for t, lp in tops[i].items()})
    for token, (logprob, top) in zip(generation.tokens, generation.logprobs or []):
        tokens.append(piece(token))
        token_logprobs.append(logprob)
        top_logprobs.append({piece(t): lp for t, lp in top.items()})
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(piece, generation) -> dict:
    """The `logprobs` of a /v1/chat/completions choice: per generated token, its log-probability and alternatives."""
    def entry(token: int, logprob: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top.items()]}
                        for token, (logprob, top) in zip(generation.tokens, generation.logprobs or [])]}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
