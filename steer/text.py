"""Text to token ids and back: chat rendering, prompt encoding, the incremental detokeniser.

Everything that turns text into a model's token ids, or ids into streamed text, lives here; the
engine itself sees token ids (:func:`steer.generation.encoded` turns a request's text into ids
with these functions before a row is queued) and keeps a :class:`TextStream` per row only for
stop strings and streamed text.

* :func:`render_chat` -- a conversation as text, by the tokenizer's chat template;
* :func:`encode_messages`, :func:`encode_chat` (one user turn), :func:`encode_text` (a raw
  prompt), :func:`encode_prompt` (exactly one of text, messages or checked ids) and
  :func:`encode_prompts` (a list of messages or ids, each bad one named);
* :func:`post_instruction_positions` -- the chat template's tokens after the user message;
* :class:`TextStream` -- incremental detokenisation with stop strings.

**A model without a chat template** (a base model) has one rule everywhere (generation,
activation reads, SAE corpora, the ``chat_template`` role-play format): the conversation is plain
text, the messages' contents one per line, with no role names or markup, and nothing is added for
the reply (no generation prompt). That text is encoded like a raw prompt, with the tokenizer's own
special tokens (e.g. BOS); a template's text is encoded without them, since the template writes
its own. So a one-message chat on a base model is exactly that message sent as a raw prompt, and
its post-instruction positions are just the last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steer.errors import InvalidArgumentError
from steer.models import ModelHandle

_PLACEHOLDER = "\u2063STEER_USER_MESSAGE\u2063"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def has_chat_template(tokenizer: Any) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_chat(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True
) -> str:
    """``messages`` as the model sees them: its chat template (with the assistant header when
    ``add_generation_prompt``), or the plain rule of the module docstring without one."""
    if not has_chat_template(tokenizer):
        return "\n".join(message.content for message in messages)
    return str(
        tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a raw prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    return list(tokenizer(text)["input_ids"])


def encode_messages(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation rendered by :func:`render_chat`."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if not has_chat_template(tokenizer):
        return encode_text(tokenizer, text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(handle: ModelHandle, user: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat prompt, ending with the assistant header."""
    messages = [Message("system", system)] if system else []
    messages.append(Message("user", user))
    return encode_messages(handle.tokenizer, messages)


def encode_prompt(
    handle: ModelHandle,
    *,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> list[int]:
    """Token ids of exactly one of a raw ``prompt``, chat ``messages`` or ``prompt_ids``
    (checked against the vocabulary); never empty."""
    given = [x is not None for x in (prompt, messages, prompt_ids)]
    if sum(given) != 1:
        raise InvalidArgumentError(
            "set exactly one of prompt, messages or prompt_ids", field="prompt"
        )
    if prompt_ids is not None:
        ids = [int(i) for i in prompt_ids]
        vocab = handle.model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidArgumentError(
                f"token ids outside [0, {vocab}): {bad[:5]}", field="prompt_ids"
            )
    elif messages is not None:
        if not messages:
            raise InvalidArgumentError("no messages", field="messages")
        ids = encode_messages(handle.tokenizer, messages)
    else:
        assert prompt is not None
        ids = encode_text(handle.tokenizer, prompt)
    if not ids:
        raise InvalidArgumentError("the prompt is empty", field="prompt")
    return ids


def encode_prompts(
    handle: ModelHandle,
    prompts: Sequence[str | Sequence[int]],
    field: str,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each of ``prompts``: a user message as a one-turn chat under ``system``,
    or token ids checked as :func:`encode_prompt` checks them; a bad prompt is named as
    ``field[index]``."""
    if isinstance(prompts, str) or not prompts:
        raise InvalidArgumentError("needs at least one prompt", field=field)
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str) and prompt:
            encoded.append(encode_chat(handle, prompt, system))
            continue
        what = "expected a non-empty string or token ids within the vocabulary"
        if isinstance(prompt, str) or not all(isinstance(i, int) for i in prompt):
            raise InvalidArgumentError(what, field=f"{field}[{index}]")
        try:  # the vocabulary and emptiness checks every prompt_ids request gets
            encoded.append(encode_prompt(handle, prompt_ids=prompt))
        except InvalidArgumentError as error:
            raise InvalidArgumentError(
                f"{what}: {error.message}", field=f"{field}[{index}]"
            ) from None
    return encoded


def post_instruction_positions(handle: ModelHandle) -> tuple[int, ...]:
    """Negative offsets of the chat template's tokens after the user message.

    E.g. for ChatML ``<|im_end|>\\n<|im_start|>assistant\\n`` these are the last 5 tokens.
    These positions are where refusal is decided (Arditi et al.). Without a chat template
    nothing follows the message, so this is the last token.
    """
    if not has_chat_template(handle.tokenizer):
        return (-1,)
    text = render_chat(handle.tokenizer, [Message("user", _PLACEHOLDER)])
    suffix = text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]
    count = len(handle.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    return tuple(range(-max(count, 1), 0))


class TextStream:
    """Incremental detokenisation with stop strings.

    Only a short window of ids is decoded per token: the text of ``ids[prefix:read]`` (already
    in ``text``) and of ``ids[prefix:]``; the difference is the new text. Decoding from a few
    tokens back keeps context-dependent spacing right, and a window that ends in an incomplete
    UTF-8 character (U+FFFD) waits for the next token. Text that might be the start of a stop
    string is held back until the next token decides it. Cost per token is O(window + stop
    length), not O(length of the reply).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        #: ids[prefix:read] produced the end of ``text``; ids[read:] are not in ``text`` yet
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _advance(self, *, final: bool = False) -> None:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text delta, stopped)."""
        self.ids.append(token_id)
        self._advance()
        cut = min(
            (i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            delta = self.text[self.emitted : cut]
            self.text = self.text[:cut]
            self.emitted = cut
            self.prefix = self.read = len(self.ids)  # nothing after a stop string is text
            return delta, True
        end = len(self.text) - self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta, False

    def _held_back(self) -> int:
        if self.text.endswith("\ufffd"):
            return 1
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def flush(self) -> str:
        """The text still held back (the reply ended)."""
        if self.read < len(self.ids):
            self._advance(final=True)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
