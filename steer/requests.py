"""Requests, events and results of generation, and the rules every engine applies alike.

:class:`~steer.generation.Engine` (transformers) and :class:`~steer.backends.vllm.VllmEngine`
take the same :class:`GenerationRequest` and emit the same :class:`GenerationEvent` stream; both
check a request with :func:`checked`, end a row by :func:`next_text` (EOS, stop strings, length)
and collect results with :func:`run_to_end`. :mod:`steer.generation` re-exports all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from steer.errors import InvalidArgumentError
from steer.interventions import Intervention
from steer.limits import MAX_TOP_LOGPROBS
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.text import Message, TextStream, encode_prompt


@dataclass(frozen=True)
class GenerationRequest:
    """One completion. Exactly one of ``prompt``, ``messages`` or ``prompt_ids`` is set."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    interventions: tuple[Intervention, ...] = ()
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    request_id: str = ""
    #: speaker of each prompt token (for speaker-scoped interventions); None = nobody's
    speakers: tuple[str | None, ...] | None = None
    #: speaker of the generated tokens (the character the model writes as)
    speaker: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationEvent:
    """A streamed piece of one request's output. The last event has ``finish_reason`` set."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    usage: Usage | None = None
    seed: int | None = None
    #: why this request failed (finish_reason "error"); the other rows of its batch go on
    error: BaseException | None = None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    usage: Usage
    seed: int


def encoded(handle: ModelHandle, request: GenerationRequest) -> GenerationRequest:
    """``request`` with its prompt as token ids: ``prompt`` or ``messages`` encoded by
    :mod:`steer.text`, ``prompt_ids`` checked against the vocabulary. The scheduler calls this
    (to check the prompt's length first) and so does :meth:`Engine.submit`; a request that is
    already ids is only checked, never encoded twice."""
    ids = encode_prompt(
        handle,
        prompt=request.prompt,
        messages=request.messages,
        prompt_ids=request.prompt_ids,
    )
    if request.prompt_ids is not None:
        return request
    return replace(request, prompt=None, messages=None, prompt_ids=tuple(ids))


def checked(handle: ModelHandle, request: GenerationRequest) -> GenerationRequest:
    """The checks every engine makes at submit (token limits), and the request as ids."""
    if request.max_new_tokens < 1:
        raise InvalidArgumentError("must be >= 1", field="max_new_tokens")
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(f"must be in [0, {MAX_TOP_LOGPROBS}]", field="top_logprobs")
    return encoded(handle, request)


def next_text(
    stream: TextStream, token: int, eos_ids: frozenset[int], generated: int, limit: int
) -> tuple[str, str | None]:
    """Every engine's rule for its ``generated``-th token: (text delta, finish reason or None).
    EOS stops (its text is not the reply's), a stop string stops, ``limit`` tokens end it."""
    if token in eos_ids:
        return stream.flush(), "stop"
    delta, stopped = stream.push(token)
    if stopped:
        return delta, "stop"
    if generated >= limit:
        return delta + stream.flush(), "length"
    return delta, None


def run_to_end(
    engine: Any,
    requests: Sequence[GenerationRequest],
    *,
    finished: Callable[[], None] | None = None,
) -> list[GenerationResult]:
    """Submit ``requests`` to ``engine`` as its queue has room (an engine's ``max_waiting``
    refuses more; a run of more requests than that is fed as rows finish) and step it until
    it has no work; results in order. ``finished`` is called as each request ends (a progress
    bar)."""
    room = max(1, engine.max_waiting)
    pending = iter(requests)
    ids: list[str] = []
    events: dict[str, list[GenerationEvent]] = {}

    def feed() -> None:
        while engine.num_waiting < room and (request := next(pending, None)) is not None:
            ids.append(engine.submit(request))
            events[ids[-1]] = []

    feed()
    while engine.has_work:
        for event in engine.step():
            if event.request_id in events:
                events[event.request_id].append(event)
                if finished is not None and event.finish_reason is not None:
                    finished()
        feed()
    return [_result(request_id, events[request_id]) for request_id in ids]


def _result(request_id: str, events: Sequence[GenerationEvent]) -> GenerationResult:
    """One request's result from its events; its error if it failed."""
    final = events[-1]
    if final.error is not None:
        raise final.error
    assert final.usage is not None and final.finish_reason is not None
    assert final.seed is not None
    return GenerationResult(
        request_id=request_id,
        token_ids=tuple(token for event in events for token in event.token_ids),
        text="".join(event.text for event in events),
        finish_reason=final.finish_reason,
        usage=final.usage,
        seed=final.seed,
    )
