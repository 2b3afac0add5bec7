"""How a gate's situations and played scenes are rendered as RP prompts (``data.gate_scenes``,
``data.gate_scenarios``): the token ids of the prompt for a character's next reply, in each of the
forms a front end sends a scene in."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import replace

from steer.calibration import Prompt
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle
from steer.rp.evaluate import reply_prompt
from steer.rp.scene import Scene, situation_scene

__all__ = ["SCENE_FORMS", "SCENE_OPENERS", "scene_prompt", "scene_prompts", "scene_tokens"]


#: the character's line before the user's turn in a situation's scene (one per situation, by a
#: hash of its text): a played scene always has history before the reply, and without it the
#: scenes sat further from real ones (written for steer)
SCENE_OPENERS = (
    '*looks up* "Yes? What is it?"',
    '"You again. Go on, then."',
    '*sets down what they were holding* "I\'m listening."',
    '"Well, don\'t just stand there."',
    '*nods* "Speak."',
    '"Ah. I wondered when you\'d come."',
)


#: the forms a situation is played in for ``data.gate_scenes``: "scene", as ``steer eval rp``,
#: gRPC scene requests and named (group) chat requests render it, the prompt ending in the
#: character's name; "chat", a chat-completion request without names (SillyTavern's Chat
#: Completion by default), the prompt ending at the chat template's assistant header
SCENE_FORMS = ("scene", "chat")


def scene_prompt(handle: ModelHandle, form: str = "scene") -> Callable[[str], Prompt]:
    """situation -> the token ids of the prompt :func:`steer.rp.evaluate.play` sends for the
    character's reply in its scene (:func:`steer.rp.scene.situation_scene`, opened by one of
    :data:`SCENE_OPENERS`): with ``form`` "scene", in the ``chat_template`` format; with
    "chat", in ``chat_completion`` (no names), under a system prompt asking for the
    character's next reply, as a chat-completion front end sends it."""
    if form not in SCENE_FORMS:
        raise InvalidArgumentError(
            f"unknown scene form {form!r}; use one of {', '.join(SCENE_FORMS)}", field="form"
        )

    def render(text: str) -> Prompt:
        opener = SCENE_OPENERS[zlib.crc32(text.encode()) % len(SCENE_OPENERS)]
        return scene_tokens(
            handle, situation_scene(text, opener=opener, field="data.gate_scenes"), form
        )

    return render


def scene_tokens(
    handle: ModelHandle, scene: Scene, form: str, speaker: str | None = None
) -> Prompt:
    """The token ids of the prompt for ``speaker``'s (default: the first character's) next
    reply in ``scene``, in scene form ``form`` (:data:`SCENE_FORMS`)."""
    speaker = scene.names[0] if speaker is None else speaker
    if form == "chat":
        main = f"Write {speaker}'s next reply in this roleplay with {scene.user.name}."
        _, tokens = reply_prompt(
            handle, replace(scene, system=main), speaker, format="chat_completion"
        )
    else:
        _, tokens = reply_prompt(handle, scene, speaker)
    return tokens.ids


def scene_prompts(handle: ModelHandle) -> tuple[Callable[[str], Prompt], ...]:
    """:func:`scene_prompt` in each of :data:`SCENE_FORMS`."""
    return tuple(scene_prompt(handle, form) for form in SCENE_FORMS)
