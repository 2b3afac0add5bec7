"""llama.cpp's own completion route, ``POST /completion``, in llama.cpp's words.

SillyTavern's "llama.cpp" Text Completion type posts to ``/completion``, not ``/v1/completions``,
and reads llama.cpp's reply: ``content`` (each streamed piece, or the whole reply), ``stop``,
and, with token probabilities on, ``completion_probabilities``. The request is the same body the
other dialects send, with llama.cpp's names (``n_predict``, ``repeat_penalty``, ``repeat_last_n``,
``n_probs``, ``samplers``, ``logit_bias`` as ``[[id, bias]]`` pairs); :func:`read_request`
reads it with :func:`steer.http.fields.parse_request`, so every sampler, slider and steering
field means what it means on ``/v1/completions``, and the generation is the same rows of the
same engine.

The reply follows llama.cpp's server (tools/server/README.md):

* not streaming: one object with ``content``, ``tokens`` (ids when ``return_tokens``),
  ``stop: true``, ``stop_type`` (``eos``, ``limit`` or ``word``), ``stopping_word``,
  ``tokens_predicted``, ``tokens_evaluated``, ``generation_settings``, ``prompt``,
  ``timings`` (measured here: queue and prompt time until the first token, then generation),
  and ``completion_probabilities`` when ``n_probs`` > 0: per token ``id``, ``token``,
  ``logprob``, ``bytes`` and ``top_logprobs`` (each ``id``, ``token``, ``logprob``, ``bytes``).
  A sampled token outside the top ``n_probs`` has ``logprob: null``.
* streaming: SSE ``data:`` lines, one per engine step with that step's ``content`` and
  ``tokens`` (``stop: false``), then the final object above with ``content: ""``; no
  ``[DONE]`` line, as llama.cpp sends none on this route. An error after the first byte is a
  ``data: {"error": ...}`` line, which SillyTavern shows.

llama.cpp has no ``n`` on this route and neither has steer's: one reply, and ``n`` > 1 is named
in the ``X-Steer-Ignored-Fields`` header. ``cache_prompt``, ``id_slot`` and ``n_keep`` are
bookkeeping of llama.cpp's slots and ignored (steer never cuts a prompt; one over the limit is
refused).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from steer.http.answers import Answer, Timer, error_body, sse, token_logprobs, token_record
from steer.http.fields import OpenAIRequest, parse_request
from steer.http.values import _flag
from steer.models import ModelHandle
from steer.requests import GenerationEvent
from steer.sampling import DEFAULT_ORDER
from steer.service.scheduler import Subscription

ROUTE = "/completion"
#: the engine's finish reasons in llama.cpp's ``stop_type`` words (a stop string is "word")
_STOP_TYPE = {"stop": "eos", "length": "limit", "cancelled": "none"}


@dataclass(frozen=True)
class Reply:
    """How one ``/completion`` request wants its answer."""

    #: ``return_tokens``: the generated ids in ``tokens`` of a body that does not stream
    return_tokens: bool

    def answer(self, parsed: OpenAIRequest, model: str, handle: ModelHandle) -> Answer:
        return LlamaCppAnswer(parsed, model, handle, self)


def read_request(body: Any) -> tuple[OpenAIRequest, Reply]:
    """A ``/completion`` body as one text completion (one row) and its reply options."""
    parsed = parse_request(body, chat=False)  # refuses a body that is no JSON object
    if parsed.n > 1:  # llama.cpp's route has no n: one reply, and the field is named ignored
        parsed = replace(parsed, n=1, ignored=tuple(sorted({*parsed.ignored, "n"})))
    return parsed, Reply(return_tokens=_flag(body, "return_tokens"))


class LlamaCppAnswer:
    """Engine events in llama.cpp's ``/completion`` reply shape (one row)."""

    media_type = "text/event-stream"

    def __init__(
        self, parsed: OpenAIRequest, model: str, handle: ModelHandle, reply: Reply
    ) -> None:
        self.parsed, self.model, self.handle, self.reply = parsed, model, handle, reply
        self.timer = Timer()

    async def collect(self, subscription: Subscription) -> dict[str, Any]:
        events = [event async for event in self.timer.events(subscription)]
        body = self._final(events, streamed=False)
        if self.parsed.logprobs:
            body["completion_probabilities"] = self._probabilities(events)
        return body

    async def stream(self, subscription: Subscription) -> AsyncIterator[bytes]:
        events: list[GenerationEvent] = []
        try:
            predicted = 0
            async for event in self.timer.events(subscription):
                events.append(event)
                predicted += len(event.token_ids)
                if event.text or event.token_ids:
                    yield sse(self._partial(event, predicted))
            yield sse(self._final(events, streamed=True))
        except Exception as error:  # after the first byte, an error can only be a line
            yield sse({"error": error_body(error)[1]})
        finally:
            subscription.cancel()

    def _partial(self, event: GenerationEvent, predicted: int) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "index": 0,
            "content": event.text,
            "tokens": list(event.token_ids),
            "stop": False,
            "id_slot": 0,
            "tokens_predicted": predicted,
        }
        if self.parsed.logprobs:
            chunk["completion_probabilities"] = self._probabilities([event])
        return chunk

    def _final(self, events: list[GenerationEvent], *, streamed: bool) -> dict[str, Any]:
        ids = [token for event in events for token in event.token_ids]
        text = "".join(event.text for event in events)
        last = events[-1] if events else GenerationEvent(request_id="")
        usage = last.usage
        prompt_n = usage.prompt_tokens if usage is not None else 0
        word = self._stopping_word(text, ids) if last.finish_reason == "stop" else ""
        stop_type = "word" if word else _STOP_TYPE.get(last.finish_reason or "", "none")
        return {
            "index": 0,
            "content": "" if streamed else text,
            "tokens": ids if self.reply.return_tokens and not streamed else [],
            "id_slot": 0,
            "stop": True,
            "model": self.model,
            "tokens_predicted": len(ids),
            "tokens_evaluated": prompt_n,
            "generation_settings": self._settings(last.seed),
            "prompt": self._prompt_text(),
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": stop_type,
            "stopping_word": word,
            "tokens_cached": 0,
            "timings": self._timings(prompt_n, len(ids)),
        }

    def _stopping_word(self, text: str, ids: list[int]) -> str:
        """The stop string that ended the reply: the longest one that starts where the reply's
        text ends, in the text of every generated token; "" when EOS ended it."""
        decoded = str(self.handle.tokenizer.decode(ids, skip_special_tokens=True))
        rest = decoded[len(text) :] if decoded.startswith(text) else ""
        found = [stop for stop in self.parsed.stop if rest.startswith(stop)]
        return max(found, key=len, default="")

    def _settings(self, seed: int | None) -> dict[str, Any]:
        sampling = self.parsed.sampling
        return {
            "n_predict": self.parsed.max_new_tokens or -1,
            "seed": seed,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "min_p": sampling.min_p,
            "stop": list(self.parsed.stop),
            "n_probs": self.parsed.logprobs,
            "samplers": list(sampling.sampler_order or DEFAULT_ORDER),
        }

    def _prompt_text(self) -> str:
        if self.parsed.prompt is not None:
            return self.parsed.prompt
        return str(self.handle.tokenizer.decode(list(self.parsed.prompt_ids or ())))

    def _timings(self, prompt_n: int, predicted_n: int) -> dict[str, Any]:
        prompt_ns, predicted_ns = self.timer.durations()
        prompt_ms, predicted_ms = prompt_ns / 1e6, predicted_ns / 1e6
        return {
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": (
                1000 * predicted_n / predicted_ms if predicted_ms > 0 else 0.0
            ),
        }

    def _probabilities(self, events: list[GenerationEvent]) -> list[dict[str, Any]]:
        tokenizer = self.handle.tokenizer
        return [
            {
                "id": token,
                **token_record(tokenizer, token, logprob),
                "top_logprobs": [{"id": t, **token_record(tokenizer, t, lp)} for t, lp in top],
            }
            for token, logprob, top in token_logprobs(events)
        ]
