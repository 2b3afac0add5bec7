"""What a Generate stream yields on the client's side: one :class:`GenerateEvent` per message,
collected into a :class:`Completion`."""

from __future__ import annotations

from dataclasses import dataclass, field

from steer.proto.v1 import generation_pb2
from steer.wire import FINISH_REASON_NAMES, SIDES


@dataclass(frozen=True)
class GenerateEvent:
    """One streamed message. ``side`` is "default"/"steered" in compare mode, else None."""

    side: str | None
    token_ids: tuple[int, ...]
    text: str
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seed: int | None = None

    @classmethod
    def from_proto(cls, message: generation_pb2.GenerateResponse) -> GenerateEvent:
        final = message.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
        return cls(
            side=SIDES.get(message.side),
            token_ids=tuple(message.token_ids),
            text=message.text,
            top_logprobs=tuple(
                tuple((c.token_id, c.logprob) for c in top.candidates)
                for top in message.top_logprobs
            ),
            finish_reason=FINISH_REASON_NAMES.get(message.finish_reason),
            prompt_tokens=message.usage.prompt_tokens if final else None,
            completion_tokens=message.usage.completion_tokens if final else None,
            seed=message.seed if message.HasField("seed") else None,
        )


@dataclass
class Completion:
    """A finished completion, collected from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int | None = None

    def add(self, event: GenerateEvent) -> None:
        self.text += event.text
        self.token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens or 0
            self.completion_tokens = event.completion_tokens or 0
            self.seed = event.seed
