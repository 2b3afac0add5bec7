"""Reply shapes of the HTTP API: OpenAI's completion JSON, its SSE chunks, and the error object.

Every route answers errors with the error object here: OpenAI's JSON error object with the HTTP
status of the error catalogue (:data:`steer.errors.HTTP_STATUS`), never a stack trace. The
generation routes reply in OpenAI's completion and chat-completion shapes: :class:`OpenAIAnswer`
turns a subscription's engine events into a body (``collect``) or an SSE stream (``stream``);
:mod:`steer.http.llamacpp` has the same two methods in llama.cpp's shape, so
:mod:`steer.http.app` runs either one the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from steer.errors import HTTP_STATUS
from steer.http.fields import OpenAIRequest
from steer.models import ModelHandle
from steer.requests import GenerationEvent
from steer.service.failures import describe
from steer.service.scheduler import Subscription

FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class Answer(Protocol):
    """What a route turns engine events into: one JSON body, or a stream of bytes."""

    #: the streamed reply's content type
    media_type: str

    async def collect(self, subscription: Subscription) -> dict[str, Any]: ...

    def stream(self, subscription: Subscription) -> AsyncIterator[bytes]: ...


class Timer:
    """A reply's clock, from the answer's creation (the request is queued) to its first token
    and on to its last: the timings llama.cpp and Ollama report."""

    def __init__(self) -> None:
        self.started = time.perf_counter_ns()
        self.first: int | None = None

    async def events(self, subscription: Subscription) -> AsyncIterator[GenerationEvent]:
        """The subscription's events (one row), the first one's arrival noted."""
        async for _, event in subscription:
            if self.first is None:
                self.first = time.perf_counter_ns()
            yield event

    def durations(self) -> tuple[int, int]:
        """(ns to the first token: queue and prompt; ns from it to now: generation)."""
        now = time.perf_counter_ns()
        first = self.first if self.first is not None else now
        return first - self.started, now - first


# -- errors -------------------------------------------------------------------------------------


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error object ``{"message", "type", "param", "code"}``)."""
    failure = describe(error)
    code, field = failure.code, failure.field
    body = {"message": failure.message, "type": code.lower(), "param": field, "code": code}
    status = HTTP_STATUS.get(code, 500)
    if code == "RESOURCE_EXHAUSTED" and field != "queue":
        # a full queue is "retry later" (429); a prompt or body over a limit is the request's
        # own fault and retrying it cannot help (OpenAI answers 400 for context length)
        status = 413 if field == "body" else 400
    return status, body


def error_response(error: BaseException) -> JSONResponse:
    status, body = error_body(error)
    return JSONResponse({"error": body}, status_code=status)


def routing_error_response(error: HTTPException) -> Response:
    """Starlette's HTTPException (404 no such route, 405 method not allowed) in OpenAI's shape,
    with its headers (``Allow`` for a 405)."""
    try:
        code = HTTPStatus(error.status_code).name
    except ValueError:
        code = str(error.status_code)
    body = {"message": str(error.detail), "type": code.lower(), "param": None, "code": code}
    return JSONResponse({"error": body}, status_code=error.status_code, headers=error.headers)


# -- OpenAI's shapes ---------------------------------------------------------------------------


def models_body(model_ids: Iterable[str]) -> dict[str, Any]:
    """``GET /v1/models``: the loaded models as OpenAI lists them."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "steer"}
            for model_id in model_ids
        ],
    }


class OpenAIAnswer:
    """Turns engine events into OpenAI completion or chat-completion JSON."""

    media_type = "text/event-stream"

    def __init__(self, parsed: OpenAIRequest, chat: bool, model: str, handle: ModelHandle) -> None:
        self.parsed, self.chat, self.model, self.handle = parsed, chat, model, handle
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return str(self.handle.tokenizer.decode([token_id]))

    def _logprobs(self, events: list[GenerationEvent]) -> dict[str, Any] | None:
        if not self.parsed.logprobs:
            return None
        entries = token_logprobs(events)
        if self.chat:
            return {"content": [self._chat_logprob(*entry) for entry in entries]}
        return {
            "tokens": [self._token(token) for token, _, _ in entries],
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in top} for _, _, top in entries],
        }

    def _chat_logprob(
        self, token: int, logprob: float | None, top: tuple[tuple[int, float], ...]
    ) -> dict[str, Any]:
        tokenizer = self.handle.tokenizer
        return {
            **token_record(tokenizer, token, logprob),
            "top_logprobs": [token_record(tokenizer, t, lp) for t, lp in top],
        }

    def _choice(self, index: int, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": logprobs,
            }
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        kind = f"{self.object}.chunk" if chunk and self.chat else self.object
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    async def collect(self, subscription: Subscription) -> dict[str, Any]:
        events: dict[int, list[GenerationEvent]] = {i: [] for i in range(self.parsed.n)}
        async for index, event in subscription:
            events[index].append(event)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, stream in events.items():
            final = stream[-1]
            text = "".join(event.text for event in stream)
            choices.append(
                self._choice(
                    index, text, FINISH.get(final.finish_reason or ""), self._logprobs(stream)
                )
            )
            if final.usage is not None:
                prompt_tokens = final.usage.prompt_tokens
                completion_tokens += final.usage.completion_tokens
        body = self._envelope(choices)
        body["usage"] = usage_body(prompt_tokens, completion_tokens)
        return body

    async def stream(self, subscription: Subscription) -> AsyncIterator[bytes]:
        prompt_tokens, completion_tokens = 0, 0
        try:
            if self.chat:
                for index in range(self.parsed.n):
                    yield sse(self._envelope([self._delta(index, "", None, role=True)], True))
            async for index, event in subscription:
                finish = FINISH.get(event.finish_reason or "")
                logprobs = self._logprobs([event])
                choice = self._delta(index, event.text, finish, logprobs=logprobs)
                yield sse(self._envelope([choice], chunk=True))
                if event.usage is not None:
                    prompt_tokens = event.usage.prompt_tokens
                    completion_tokens += event.usage.completion_tokens
            if self.parsed.include_usage:
                body = self._envelope([], chunk=True)
                body["usage"] = usage_body(prompt_tokens, completion_tokens)
                yield sse(body)
        except Exception as error:  # after the first byte, an error can only be a chunk
            yield sse({"error": error_body(error)[1]})
        finally:
            subscription.cancel()
        yield b"data: [DONE]\n\n"

    def _delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        *,
        role: bool = False,
        logprobs: Any = None,
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def token_logprobs(
    events: list[GenerationEvent],
) -> list[tuple[int, float | None, tuple[tuple[int, float], ...]]]:
    """Each generated token of ``events`` with its log-probability (None when it is not among
    its step's top candidates) and that step's top candidates."""
    entries = []
    for event in events:
        candidates = dict(event.top_logprobs)
        for token in event.token_ids:
            entries.append((token, candidates.get(token), event.top_logprobs))
    return entries


def token_record(tokenizer: Any, token_id: int, logprob: float | None) -> dict[str, Any]:
    """One token as OpenAI's chat logprobs and llama.cpp's probabilities write it: its text,
    log-probability and UTF-8 bytes."""
    text = str(tokenizer.decode([token_id]))
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(body: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
