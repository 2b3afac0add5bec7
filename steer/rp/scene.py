"""The roleplay conversation as data: characters, a user persona, turns and the setting."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from steer.errors import InvalidArgumentError
from steer.json_input import json_type

#: what a turn is: an in-character message, out-of-character talk, or an author's note
TURN_KINDS = ("message", "ooc", "note")

_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(BOT|USER)>", re.IGNORECASE)


def substitute(text: str, char: str, user: str) -> str:
    """Replace ``{{char}}``/``{{user}}`` (any case, and TavernAI's ``<BOT>``/``<USER>``)."""

    def name(match: re.Match[str]) -> str:
        key = (match.group(1) or match.group(2)).lower()
        return char if key in ("char", "bot") else user

    return _MACRO.sub(name, text)


@dataclass(frozen=True)
class Character:
    """A character (or the user's persona): what a character card holds."""

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_message: str = ""
    example_dialogue: str = ""
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidArgumentError("a character needs a non-empty name", field="name")
        _check_text(self, _CHARACTER_TEXTS)

    def profile(self) -> str:
        """Description and personality as one text."""
        parts = [self.description.strip()]
        if self.personality.strip():
            parts.append(f"Personality: {self.personality.strip()}")
        return "\n".join(p for p in parts if p)

    def with_user(self, user: str) -> Character:
        """This character with ``{{char}}``/``{{user}}`` filled in."""
        fields = ("description", "personality", "scenario", "first_message", "example_dialogue")
        values = {f: substitute(getattr(self, f), self.name, user) for f in fields}
        values["system_prompt"] = substitute(self.system_prompt, self.name, user)
        return replace(self, **values)


@dataclass(frozen=True)
class Turn:
    """One entry of the chat. ``speaker`` is a character's or the user's name."""

    speaker: str
    content: str
    kind: str = "message"
    #: a length hint for formats that have them (e.g. "medium")
    length: str | None = None

    def __post_init__(self) -> None:
        _check_text(self, ("speaker", "content", "kind"))
        if self.length is not None:
            _check_text(self, ("length",))
        if self.kind not in TURN_KINDS:
            raise InvalidArgumentError(
                f"unknown kind {self.kind!r}; use {TURN_KINDS}", field="kind"
            )


@dataclass(frozen=True)
class Scene:
    """Everything a prompt format renders: who is there, what happened, and the setting."""

    characters: tuple[Character, ...]
    user: Character = field(default_factory=lambda: Character("User"))
    turns: tuple[Turn, ...] = ()
    scenario: str = ""
    title: str = ""
    tags: tuple[str, ...] = ()
    lore: str = ""
    #: a system instruction placed before everything else
    system: str = ""

    def __post_init__(self) -> None:
        if not self.characters:
            raise InvalidArgumentError("a scene needs at least one character", field="characters")
        names = [c.name for c in self.characters] + [self.user.name]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"names must differ, got {names}", field="characters")
        known = set(names)
        for index, turn in enumerate(self.turns):
            if turn.kind == "message" and turn.speaker not in known:
                raise InvalidArgumentError(
                    f"turn {index} is spoken by {turn.speaker!r}, who is not in the scene "
                    f"({sorted(known)})",
                    field="turns",
                )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.characters)

    def character(self, name: str) -> Character:
        for character in self.characters:
            if character.name == name:
                return character
        raise InvalidArgumentError(
            f"{name!r} is not a character of this scene ({list(self.names)})", field="speaker"
        )

    def with_turn(self, turn: Turn) -> Scene:
        return replace(self, turns=(*self.turns, turn))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        """Build from the JSON shape used in recipes/data/rp_scenarios.jsonl; a malformed part
        raises InvalidArgumentError naming it (``characters[1].description``)."""
        user = _built(Character, data.get("user", {"name": "User"}), "user")
        characters = _built_each(Character, data.get("characters"), "characters")
        if not characters:
            raise InvalidArgumentError("a scene needs at least one character", field="characters")
        turns = _built_each(Turn, data.get("turns", ()), "turns")
        tags = data.get("tags", ())
        if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
            raise InvalidArgumentError("tags are a list of strings", field="tags")
        texts = {key: data.get(key, "") for key in ("scenario", "title", "lore", "system")}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise InvalidArgumentError(f"must be a string, not {json_type(value)}", field=key)
        characters = tuple(c.with_user(user.name) for c in characters)
        char = characters[0].name
        turns = tuple(replace(t, content=substitute(t.content, char, user.name)) for t in turns)
        texts["scenario"] = substitute(texts["scenario"], char, user.name)
        return cls(characters=characters, user=user, turns=turns, tags=tuple(tags), **texts)


_CHARACTER_TEXTS = (
    "description",
    "personality",
    "scenario",
    "first_message",
    "example_dialogue",
    "system_prompt",
)
_Part = TypeVar("_Part", Character, Turn)


def _check_text(part: Character | Turn, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(part, name)
        if not isinstance(value, str):
            raise InvalidArgumentError(f"must be a string, not {json_type(value)}", field=name)


def _built(kind: type[_Part], value: Any, field: str) -> _Part:
    """``kind(**value)`` for a JSON object ``value``; its errors name ``field``."""
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"must be an object, not {json_type(value)}", field=field)
    try:
        return kind(**value)
    except TypeError as error:  # a key it does not have, or a missing name
        raise InvalidArgumentError(f"malformed: {error}", field=field) from None
    except InvalidArgumentError as error:
        inner = f"{field}.{error.field}" if error.field else field
        raise InvalidArgumentError(error.message, field=inner) from None


def _built_each(kind: type[_Part], values: Any, field: str) -> tuple[_Part, ...]:
    if not isinstance(values, (list, tuple)):
        raise InvalidArgumentError(f"must be a list, not {json_type(values)}", field=field)
    return tuple(_built(kind, value, f"{field}[{index}]") for index, value in enumerate(values))


#: titles whose period does not end WHO ("You are Dr. Okafor, a ship's doctor. ...")
_TITLES = ("Mr", "Mrs", "Ms", "Dr", "St", "Prof", "Capt", "Lt", "Sgt", "Col", "Gen", "Mt")
#: a one-message RP situation: "You are WHO. EVENT" (recipes/moralizing_pairs.jsonl, rp_benign.txt)
_SITUATION = re.compile(
    rf"\s*You are (?P<who>(?:\b(?:{'|'.join(_TITLES)})\.\s+|[^.])+?)"
    + "".join(rf"(?<!\b{title})" for title in _TITLES)
    + r"\.\s+(?P<event>\S.*)",
    re.DOTALL,
)
#: the closing cue a situation gives the model, which a played scene does not carry
_REPLY_CUE = re.compile(r"\s*(?:Reply|Respond) in character\.\s*$")


def situation_scene(text: str, *, opener: str = "", field: str = "situation") -> Scene:
    """A one-message RP situation ("You are Bram, a village baker. A customer asks ...
    Reply in character.") as a scene: a card saying who the character is, the character's
    ``opener`` line if given, then the event as the user's turn (without the "Reply in
    character." cue). The character is named by what precedes the first comma of WHO."""
    match = _SITUATION.fullmatch(text)
    if match is None:
        raise InvalidArgumentError(f"expected 'You are WHO. EVENT', got {text[:60]!r}", field=field)
    who = match.group("who").strip()
    event = _REPLY_CUE.sub("", match.group("event")).strip() or match.group("event").strip()
    name = who.split(",")[0].strip()
    if name == "User":
        raise InvalidArgumentError("the character cannot be named 'User'", field=field)
    turns = (Turn(name, opener),) if opener else ()
    return Scene(
        characters=(Character(name, description=f"{{{{char}}}} is {who}."),),
        user=Character("User"),
        turns=(*turns, Turn("User", event)),
    )
