"""Prompt formats: a registry of renderers from a :class:`Scene` to prompt text.

Every format returns a :class:`Rendered`: the text, the character span of each speaker's words
(so :func:`tokenize` can label every prompt token with its speaker for speaker-scoped
interventions), and the stop strings that end the reply. The speaker-name prefix of a message
("Alice: ") counts as Alice's; headers, descriptions and template markup belong to nobody.

Registered formats (``FORMATS``):

* ``chat_template`` -- the tokenizer's own chat template (default); characters are the assistant,
  the user's persona is the user, names prefix every message (a model without a chat template:
  :mod:`steer.text`'s plain rule, one message per line)
* ``chat_completion`` -- the same without names: a chat-completion request's prompt, ending at
  the template's generation prompt
* ``chatml``, ``mistral``, ``llama3`` -- the instruct formats written out
* ``alpaca`` -- LimaRP's extended Alpaca (``### Instruction:`` with personas and scenario,
  ``### Input:`` / ``### Response: (length = medium)``)
* ``limamono`` -- Limamono's trigger phrase, the character name on the instruction's first line,
  ``Scenario:`` last
* ``shorirp`` -- ShoriRP's blocks ``▀role ...▄`` (title, tags, lore, description, scenario,
  message, ooc; ``(length: medium)``; ``▄`` stops), ``[INST] ... [/INST]`` author's notes
* :class:`TemplateFormat` -- a user-written template string, registered under its own name

A new format is one class with ``name`` and ``render`` passed to :func:`register`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

from steer.errors import InvalidArgumentError
from steer.rp.rendering import (
    Builder,
    PromptFormat,
    Rendered,
    add_message,
    check_length,
    check_speaker,
    role_of,
    setting_text,
)
from steer.rp.scene import Scene, Turn
from steer.text import Message, has_chat_template, render_chat

#: length words per format family, as documented on the model cards
LIMARP_LENGTHS = (
    "micro",
    "tiny",
    "short",
    "medium",
    "long",
    "massive",
    "huge",
    "enormous",
    "humongous",
    "unlimited",
)
LIMAMONO_LENGTHS = ("micro", "tiny", "short", "medium", "long", "massive", "huge")
SHORIRP_LENGTHS = (
    "nano",
    "micro",
    "tiny",
    "short",
    "medium",
    "long",
    "massive",
    "huge",
    "enormous",
)

LIMAMONO_TRIGGER = (
    "Below is an instruction that describes background information for a story-rich chat. "
    "Write an appropriate response for both the instruction and user input."
)


# -------------------------------------------------------------------------------------------------
# Role-based instruct formats


@dataclass(frozen=True)
class _RoleMarkup:
    """How a role-based format writes a block: ``prefix(role) + body + suffix``."""

    begin: str
    role_prefix: dict[str, str]
    suffix: str
    stop: tuple[str, ...]


class _RoleFormat:
    """Shared renderer for ChatML and Llama 3: one block per turn, system block first."""

    name = ""
    markup: _RoleMarkup

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        markup = self.markup
        builder = Builder().add(markup.begin)
        setting = setting_text(scene)
        if setting:
            builder.add(markup.role_prefix["system"] + setting + markup.suffix)
        for turn in scene.turns:
            builder.add(markup.role_prefix[role_of(scene, turn)])
            add_message(builder, turn)
            builder.add(markup.suffix)
        builder.add(markup.role_prefix["assistant"]).add(f"{speaker}:", speaker)
        return builder.build(scene, speaker, markup.stop)


class ChatML(_RoleFormat):
    name = "chatml"
    markup = _RoleMarkup(
        begin="",
        role_prefix={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
        suffix="<|im_end|>\n",
        stop=("<|im_end|>",),
    )


class Llama3(_RoleFormat):
    name = "llama3"
    markup = _RoleMarkup(
        begin="<|begin_of_text|>",
        role_prefix={
            r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"
            for r in ("system", "user", "assistant")
        },
        suffix="<|eot_id|>",
        stop=("<|eot_id|>",),
    )


class Mistral:
    """``<s>[INST] system + user [/INST] reply</s>[INST] ...``; user-side turns in a row merge."""

    name = "mistral"

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        builder = Builder().add("<s>")
        pending: list[Turn] = []
        setting = setting_text(scene)

        def flush_instruction(first: bool) -> None:
            builder.add("[INST] ")
            if first and setting:
                builder.add(setting + ("\n\n" if pending else ""))
            for index, turn in enumerate(pending):
                if index:
                    builder.add("\n")
                add_message(builder, turn)
            builder.add(" [/INST]")
            pending.clear()

        first = True
        for turn in scene.turns:
            if role_of(scene, turn) == "assistant":
                if pending or first:
                    flush_instruction(first)
                    first = False
                builder.add(" ")
                add_message(builder, turn)
                builder.add("</s>")
            else:
                pending.append(turn)
        if pending or first:
            flush_instruction(first)
        builder.add(" ").add(f"{speaker}:", speaker)
        return builder.build(scene, speaker, ("</s>", "[INST]"))


class ChatTemplate:
    """The tokenizer's own chat template (:func:`steer.text.render_chat`, so a model without one
    gets its plain rule: one message per line); message text is located in the output to label
    it."""

    name = "chat_template"
    #: "Name: " before every message and the reply (not in :class:`ChatCompletion`)
    names = True

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        if tokenizer is None:
            raise InvalidArgumentError(
                "the chat_template format renders with the model's tokenizer; pass "
                "tokenizer=handle.tokenizer to render, or choose a format written out "
                "(chatml, mistral, llama3, ...)",
                field="tokenizer",
            )
        messages: list[Message] = []
        labelled: list[tuple[str, str | None]] = []
        setting = setting_text(scene)
        if setting:
            messages.append(Message("system", setting))
            labelled.append((setting, None))
        for turn in scene.turns:
            role = role_of(scene, turn)
            if turn.kind == "message":
                content = f"{turn.speaker}: {turn.content}" if self.names else turn.content
                who = turn.speaker
            elif turn.kind == "ooc":
                content, who = f"(OOC: {turn.content})", None
            else:
                content, who = f"[Note: {turn.content}]", None
            messages.append(Message(role, content))
            labelled.append((content, who))
        if not messages:  # a chat template cannot render an empty conversation
            raise InvalidArgumentError(
                "nothing to render: the scene has no description, scenario or turns",
                field="turns",
            )
        text = render_chat(tokenizer, messages)
        if not has_chat_template(tokenizer):
            # steer.text's plain rule adds nothing for the reply: its name starts a line
            text += "\n"
        spans: list[tuple[int, int, str]] = []
        cursor = 0
        for content, who in labelled:
            start = text.find(content, cursor)
            if start < 0:
                # the template rewrote the content (e.g. stripped it): leave it unlabelled
                continue
            cursor = start + len(content)
            if who is not None:
                spans.append((start, cursor, who))
        prefix = f"{speaker}:" if self.names else ""
        if prefix:
            spans.append((len(text), len(text) + len(prefix), speaker))
        stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
        user = f"\n{scene.user.name}:"
        return Rendered(
            text + prefix, tuple(spans), tuple(dict.fromkeys([*stops, user])), speaker, (user,)
        )


class ChatCompletion(ChatTemplate):
    """The chat template without names, ending at its generation prompt: a chat-completion
    request without speaker names (SillyTavern's Chat Completion default; ``steer serve``)."""

    name = "chat_completion"
    names = False


# -------------------------------------------------------------------------------------------------
# Roleplay formats from the model cards


class _AlpacaFamily:
    """What Alpaca and Limamono share: the turns after the instruction."""

    name = ""
    lengths: tuple[str, ...] = ()
    #: what comes before each ``###`` header
    gap = "\n\n"

    def _turns(self, builder: Builder, scene: Scene, speaker: str, length: str | None) -> Rendered:
        """``### Input:`` / ``### Response:`` blocks with length hints, then the reply's header
        and name."""
        for turn in scene.turns:
            check_length(turn.length, self.lengths, self.name)
            header = "### Input:" if role_of(scene, turn) != "assistant" else "### Response:"
            builder.add(f"{self.gap}{header}{_hint(turn.length)}\n")
            add_message(builder, turn)
        builder.add(f"{self.gap}### Response:{_hint(length)}\n").add(f"{speaker}:", speaker)
        return builder.build(scene, speaker, ("\n###",))


class Alpaca(_AlpacaFamily):
    """LimaRP's extended Alpaca (seed 002)."""

    name = "alpaca"
    lengths = LIMARP_LENGTHS

    def _instruction(self, scene: Scene, speaker: str) -> str:
        lines = []
        if scene.system.strip():
            lines.append(scene.system.strip())
        for character in scene.characters:
            lines.append(f"{character.name}'s Persona: {character.profile()}")
        lines.append(f"{scene.user.name}'s Persona: {scene.user.profile()}")
        if scene.scenario.strip():
            lines.append(f"Scenario: {scene.scenario.strip()}")
        user = scene.user.name
        lines.append(
            f"Play the role of {speaker}. You must engage in a roleplaying chat with {user} "
            f"below this line. Do not write dialogues and narration for {user}."
        )
        return "\n".join(lines)

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        check_length(length, self.lengths, self.name)
        builder = Builder().add("### Instruction:\n" + self._instruction(scene, speaker))
        return self._turns(builder, scene, speaker, length)


def _hint(length: str | None) -> str:
    return f" (length = {length})" if length else ""


class Limamono(_AlpacaFamily):
    """Limamono's variant (seed 004): trigger phrase, name first, ``Scenario:`` last, no blanks."""

    name = "limamono"
    lengths = LIMAMONO_LENGTHS
    gap = "\n"

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        character = scene.character(speaker)
        check_length(length, self.lengths, self.name)
        sheet = [character.name, character.profile()]
        for other in scene.characters:
            if other.name != speaker:
                sheet += [other.name, other.profile()]
        if scene.scenario.strip():
            sheet.append(f"Scenario: {scene.scenario.strip()}")
        builder = Builder().add(LIMAMONO_TRIGGER + "\n### Instruction:\n")
        builder.add("\n".join(line for line in sheet if line))
        return self._turns(builder, scene, speaker, length)


class ShoriRP:
    """ShoriRP's block format (seed 003): ``▀role content▄`` per block, one per line."""

    name = "shorirp"
    lengths = SHORIRP_LENGTHS

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        check_length(length, self.lengths, self.name)
        builder = Builder()
        if scene.system.strip():
            builder.add(f"[INST] {scene.system.strip()} [/INST]\n")
        if scene.title:
            builder.add(f"▀title {scene.title}▄\n")
        if scene.tags:
            builder.add(f"▀tags {', '.join(scene.tags)}▄\n")
        if scene.lore.strip():
            builder.add(f"▀lore {scene.lore.strip()}▄\n")
        for person in (*scene.characters, scene.user):
            profile = person.profile()
            if profile:
                if person.name not in profile:
                    profile = f"**Name:** {person.name}\n{profile}"
                builder.add(f"▀description {profile}▄\n")
        if scene.scenario.strip():
            builder.add(f"▀scenario {scene.scenario.strip()}▄\n")
        for turn in scene.turns:
            check_length(turn.length, self.lengths, self.name)
            if turn.kind == "note":
                builder.add(f"[INST] {turn.content} [/INST]\n")
            elif turn.kind == "ooc":
                builder.add(f"▀ooc {turn.content}▄\n")
            else:
                builder.add(f"▀message{_block_hint(turn.length)} ")
                builder.add(f"{turn.speaker}: {turn.content}", turn.speaker).add("▄\n")
        builder.add(f"▀message{_block_hint(length)} ").add(f"{speaker}:", speaker)
        return builder.build(scene, speaker, ("▄",))


def _block_hint(length: str | None) -> str:
    return f" (length: {length})" if length else ""


@dataclass(frozen=True)
class TemplateFormat:
    """A user-written format from ``str.format`` templates.

    ``preamble`` may use ``{system}``, ``{char}``, ``{user}``, ``{description}`` (every
    character's profile), ``{persona}`` and ``{scenario}``; ``user_message`` and ``char_message``
    use ``{name}`` and ``{content}``; ``reply`` uses ``{name}`` and ends where the model writes.
    """

    name: str
    preamble: str = "{system}\n{description}\n{persona}\nScenario: {scenario}\n"
    user_message: str = "{name}: {content}\n"
    char_message: str = "{name}: {content}\n"
    reply: str = "{name}:"
    stop: tuple[str, ...] = ()

    _PREAMBLE_FIELDS = frozenset({"system", "char", "user", "description", "persona", "scenario"})
    _MESSAGE_FIELDS = frozenset({"name", "content"})

    def __post_init__(self) -> None:
        checks = (
            ("preamble", self._PREAMBLE_FIELDS),
            ("user_message", self._MESSAGE_FIELDS),
            ("char_message", self._MESSAGE_FIELDS),
            ("reply", frozenset({"name"})),
        )
        for field_name, allowed in checks:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(getattr(self, field_name))}
            except ValueError as error:
                raise InvalidArgumentError(str(error), field=field_name) from None
            unknown = {f for f in fields if f is not None} - allowed
            if unknown:
                raise InvalidArgumentError(
                    f"unknown placeholders {sorted(unknown)}; use {sorted(allowed)}",
                    field=field_name,
                )
        object.__setattr__(self, "stop", tuple(self.stop))

    def render(
        self, scene: Scene, speaker: str, *, length: str | None = None, tokenizer: Any = None
    ) -> Rendered:
        check_speaker(scene, speaker)
        builder = Builder().add(
            self.preamble.format(
                system=scene.system,
                char=speaker,
                user=scene.user.name,
                description="\n".join(f"{c.name}: {c.profile()}" for c in scene.characters),
                persona=scene.user.profile(),
                scenario=scene.scenario,
            )
        )
        for turn in scene.turns:
            template = self.user_message if turn.speaker == scene.user.name else self.char_message
            name = turn.speaker if turn.kind == "message" else "OOC"
            text = template.format(name=name, content=turn.content)
            builder.add(text, turn.speaker if turn.kind == "message" else None)
        builder.add(self.reply.format(name=speaker), speaker)
        return builder.build(scene, speaker, self.stop)


FORMATS: dict[str, PromptFormat] = {}


def register(prompt_format: PromptFormat) -> PromptFormat:
    FORMATS[prompt_format.name] = prompt_format
    return prompt_format


for _kind in (ChatTemplate, ChatCompletion, ChatML, Mistral, Llama3, Alpaca, Limamono, ShoriRP):
    register(_kind())


def get_format(name: str) -> PromptFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown prompt format {name!r}; choose from {sorted(FORMATS)}", field="format"
        ) from None


@dataclass(frozen=True)
class PromptTokens:
    """A rendered prompt as token ids with one speaker label per token."""

    ids: tuple[int, ...]
    speakers: tuple[str | None, ...]
    rendered: Rendered = field(repr=False)


def tokenize(tokenizer: Any, rendered: Rendered) -> PromptTokens:
    """Token ids and per-token speakers (from the offsets mapping of a fast tokenizer).

    A token's speaker is the speaker of its first non-space character, so a leading-space token
    (" Alice") belongs to the word it carries, not to the separator before it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgumentError(
            "speaker labels need a fast tokenizer (offsets mapping)", field="tokenizer"
        )
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    labels: list[str | None] = []
    text = rendered.text
    for start, end in encoded["offset_mapping"]:
        index = start
        while index < end - 1 and text[index].isspace():
            index += 1
        labels.append(rendered.speaker_at(index) if end > start else None)
    return PromptTokens(tuple(encoded["input_ids"]), tuple(labels), rendered)
