"""Shared pieces of the prompt formats: the rendered prompt, its speaker spans, their builder.

:class:`Rendered` is what every format of :mod:`steer.rp.formats` returns; :class:`Builder`
records whose words each piece of text is while a format writes it; the setting block, a
message and a turn's role are written the same way by every format that has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from steer.errors import InvalidArgumentError
from steer.rp.scene import Scene, Turn


@dataclass(frozen=True)
class Rendered:
    """A rendered prompt: text, speaker spans over it, stop strings, and the replying speaker."""

    text: str
    #: (start, end, speaker) character spans; text outside every span belongs to nobody
    spans: tuple[tuple[int, int, str], ...]
    stop: tuple[str, ...]
    speaker: str
    #: stop strings that mean the model started writing the user's lines
    impersonation_stop: tuple[str, ...] = ()

    def speaker_at(self, index: int) -> str | None:
        for start, end, speaker in self.spans:
            if start <= index < end:
                return speaker
        return None


class Builder:
    """Prompt text built piece by piece, with the character span of each speaker's pieces."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int, str]] = []

    def add(self, text: str, speaker: str | None = None) -> Builder:
        if speaker is not None and text:
            self.spans.append((self.length, self.length + len(text), speaker))
        self.parts.append(text)
        self.length += len(text)
        return self

    def build(
        self, scene: Scene, speaker: str, stop: Sequence[str], user_stops: bool = True
    ) -> Rendered:
        impersonation = (f"\n{scene.user.name}:",) if user_stops else ()
        return Rendered(
            text="".join(self.parts),
            spans=tuple(self.spans),
            stop=tuple(dict.fromkeys([*stop, *impersonation])),
            speaker=speaker,
            impersonation_stop=impersonation,
        )


class PromptFormat(Protocol):
    @property
    def name(self) -> str: ...

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        """Render ``scene`` up to the start of ``speaker``'s next message."""
        ...


def check_length(length: str | None, allowed: Sequence[str], format_name: str) -> None:
    if length is not None and length not in allowed:
        raise InvalidArgumentError(
            f"{format_name} has no length {length!r}; use one of {list(allowed)}", field="length"
        )


def check_speaker(scene: Scene, speaker: str) -> None:
    scene.character(speaker)


def setting_text(scene: Scene) -> str:
    """System prompt, character profiles, persona and scenario as one plain text block."""
    parts = [scene.system.strip()] if scene.system.strip() else []
    for character in scene.characters:
        if character.system_prompt.strip():
            parts.append(character.system_prompt.strip())
    for character in scene.characters:
        if character.profile():
            parts.append(f"{character.name}'s Persona: {character.profile()}")
    if scene.user.profile():
        parts.append(f"{scene.user.name}'s Persona: {scene.user.profile()}")
    if scene.scenario.strip():
        parts.append(f"Scenario: {scene.scenario.strip()}")
    return "\n".join(parts)


def add_message(builder: Builder, turn: Turn) -> None:
    """``Name: content`` labelled as the speaker's; OOC and notes are nobody's."""
    if turn.kind == "message":
        builder.add(f"{turn.speaker}: {turn.content}", turn.speaker)
    elif turn.kind == "ooc":
        builder.add(f"(OOC: {turn.content})")
    else:
        builder.add(f"[Note: {turn.content}]")


def role_of(scene: Scene, turn: Turn) -> str:
    if turn.kind == "note":
        return "system"
    if turn.kind == "ooc" or turn.speaker == scene.user.name:
        return "user"
    return "assistant"
