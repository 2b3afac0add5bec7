"""steer.text is the one home of chat rendering: every path renders and encodes alike.

A model without a chat template used to get a different fallback on each path (the engine
raised, activation reads dropped the system message, SAE corpora wrote ``user\\nassistant``, the
``chat_template`` role-play format raised). These tests pin the one rule (steer/text.py's
docstring) on every path, and that with a template the paths give the same ids.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from tiny import tiny_tokenizer

from steer.activations import encode_chat, post_instruction_positions
from steer.generation import Engine, GenerationRequest, Message
from steer.models import ModelHandle
from steer.rp import Character, Scene, Turn, get_format
from steer.sae.corpus import generate_corpus
from steer.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
USER = "How do I bake bread at home?"
SYSTEM = "You are a baker."


@pytest.fixture(scope="module")
def base(tiny_llama: ModelHandle) -> ModelHandle:
    """The tiny model with a tokenizer that has no chat template (a base model)."""
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = None
    return replace(tiny_llama, tokenizer=tokenizer)


def _raw(handle: ModelHandle, text: str) -> list[int]:
    return list(handle.tokenizer(text)["input_ids"])


def test_without_a_template_a_chat_is_its_messages_one_per_line(base: ModelHandle) -> None:
    assert base.chat_template is None
    assert encode_chat(base, USER) == _raw(base, USER)
    # the system message is a line of the prompt, not dropped
    assert encode_chat(base, USER, SYSTEM) == _raw(base, f"{SYSTEM}\n{USER}")
    assert post_instruction_positions(base) == (-1,)


def test_without_a_template_the_engine_takes_messages_as_plain_text(base: ModelHandle) -> None:
    messages = (Message("system", SYSTEM), Message("user", USER))
    chat, plain = Engine(base).run(
        [
            GenerationRequest(messages=messages, sampling=GREEDY, max_new_tokens=6),
            GenerationRequest(prompt=f"{SYSTEM}\n{USER}", sampling=GREEDY, max_new_tokens=6),
        ]
    )
    assert chat.token_ids == plain.token_ids
    assert chat.usage.prompt_tokens == len(encode_chat(base, USER, SYSTEM))


def test_without_a_template_the_chat_template_format_renders_plain_lines(
    base: ModelHandle,
) -> None:
    scene = Scene(
        characters=(Character("Ann", description="A baker."),),
        user=Character("Bo"),
        turns=(Turn("Bo", "Hello."), Turn("Ann", "Hi, Bo.")),
    )
    rendered = get_format("chat_template").render(scene, "Ann", tokenizer=base.tokenizer)
    assert rendered.text.endswith("Bo: Hello.\nAnn: Hi, Bo.\nAnn:")
    assert "<|im_start|>" not in rendered.text
    assert rendered.speaker_at(rendered.text.index("Hi, Bo.")) == "Ann"
    assert rendered.speaker_at(len(rendered.text) - 1) == "Ann"


def test_without_a_template_a_corpus_transcript_is_prompt_then_reply(base: ModelHandle) -> None:
    (transcript,) = generate_corpus(base, [USER], max_new_tokens=4, temperature=0.0)
    assert transcript.startswith(f"{USER}\n")


def test_with_a_template_every_path_encodes_the_same_ids(tiny_llama: ModelHandle) -> None:
    tokenizer = tiny_llama.tokenizer
    expected = tokenizer(
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert encode_chat(tiny_llama, USER, SYSTEM) == expected
    messages = (Message("system", SYSTEM), Message("user", USER))
    chat, ids = Engine(tiny_llama).run(
        [
            GenerationRequest(messages=messages, sampling=GREEDY, max_new_tokens=4),
            GenerationRequest(prompt_ids=tuple(expected), sampling=GREEDY, max_new_tokens=4),
        ]
    )
    assert chat.token_ids == ids.token_ids and chat.usage.prompt_tokens == len(expected)
    # ChatML: exactly "<|im_end|>\n<|im_start|>assistant\n" follows the user message
    positions = post_instruction_positions(tiny_llama)
    assert positions == tuple(range(positions[0], 0))
    after = tokenizer.decode(expected[positions[0] :])
    assert after == "<|im_end|>\n<|im_start|>assistant\n"


def test_the_engine_queues_ids_and_encodes_a_request_once(tiny_llama: ModelHandle) -> None:
    from steer.generation import encoded

    request = GenerationRequest(prompt=USER, sampling=GREEDY, max_new_tokens=3)
    as_ids = encoded(tiny_llama, request)
    assert as_ids.prompt is None and as_ids.messages is None
    assert as_ids.prompt_ids == tuple(_raw(tiny_llama, USER))
    assert encoded(tiny_llama, as_ids) is as_ids  # ids are only checked, not encoded again
    (text,), (ids,) = Engine(tiny_llama).run([request]), Engine(tiny_llama).run([as_ids])
    assert text.token_ids == ids.token_ids
