"""Prompt formats: golden renders (the seeds' own examples), speaker labels, cards, presets."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest
from tiny import tiny_tokenizer

from steer.errors import InvalidArgumentError, NotFoundError
from steer.rp import (
    FORMATS,
    Character,
    Scene,
    Turn,
    card_from_json,
    get_format,
    preset_config,
    read_card,
    register,
    substitute,
    tokenize,
    write_png_card,
)
from steer.rp.cards import PNG_SIGNATURE, card_to_json
from steer.rp.evaluate import load_scenarios
from steer.rp.formats import TemplateFormat
from steer.rp.presets import PRESETS, load_preset
from steer.text import Message, encode_messages

REIMU = Character(
    "Reimu",
    "**Name:** Reimu Hakurei\n**Age:** 18\n**Personality:** Calm and collected.",
)
MARISA = Character("Marisa", "**Name:** Marisa Kirisame\n**Personality:** Impulsive and energetic.")
GENSOKYO = Scene(
    characters=(REIMU, MARISA),
    user=Character("Chen"),
    title="A strange incident in Gensokyo",
    tags=("barrier", "danmaku", "magic", "reimu", "marisa"),
    turns=(
        Turn("Reimu", '"Hmm... I wonder what\'s going on?" Reimu mused.', length="medium"),
        Turn("Marisa", '"Ooohh! Reimu-chan~!"', length="short"),
    ),
)


def test_shorirp_renders_the_seed_practical_example() -> None:
    rendered = get_format("shorirp").render(GENSOKYO, "Reimu", length="long")
    assert rendered.text == (
        "▀title A strange incident in Gensokyo▄\n"
        "▀tags barrier, danmaku, magic, reimu, marisa▄\n"
        "▀description **Name:** Reimu Hakurei\n**Age:** 18\n**Personality:** Calm and collected.▄\n"
        "▀description **Name:** Marisa Kirisame\n**Personality:** Impulsive and energetic.▄\n"
        '▀message (length: medium) Reimu: "Hmm... I wonder what\'s going on?" Reimu mused.▄\n'
        '▀message (length: short) Marisa: "Ooohh! Reimu-chan~!"▄\n'
        "▀message (length: long) Reimu:"
    )
    assert rendered.stop[0] == "▄"


def test_shorirp_author_note_and_ooc_blocks() -> None:
    scene = Scene(
        characters=(Character("Chen"), Character("Yukari")),
        user=Character("Anon"),
        turns=(
            Turn("Chen", "[...]"),
            Turn("", "Yukari's personality: proud, haughty", kind="note"),
            Turn("", "brb", kind="ooc"),
        ),
    )
    text = get_format("shorirp").render(scene, "Yukari").text
    assert text == (
        "▀message Chen: [...]▄\n"
        "[INST] Yukari's personality: proud, haughty [/INST]\n"
        "▀ooc brb▄\n"
        "▀message Yukari:"
    )


LIMA = Scene(
    characters=(Character("Character", "{bot character description}"),),
    user=Character("User", "{user character description}"),
    scenario="{what happens in the story}",
    turns=(
        Turn("User", "{utterance}"),
        Turn("Character", "{utterance}"),
        Turn("User", "{utterance}"),
    ),
)


def test_alpaca_renders_the_limarp_template() -> None:
    rendered = get_format("alpaca").render(LIMA, "Character", length="medium")
    assert rendered.text == (
        "### Instruction:\n"
        "Character's Persona: {bot character description}\n"
        "User's Persona: {user character description}\n"
        "Scenario: {what happens in the story}\n"
        "Play the role of Character. You must engage in a roleplaying chat with User below this "
        "line. Do not write dialogues and narration for User.\n\n"
        "### Input:\nUser: {utterance}\n\n"
        "### Response:\nCharacter: {utterance}\n\n"
        "### Input:\nUser: {utterance}\n\n"
        "### Response: (length = medium)\nCharacter:"
    )
    assert "\n###" in rendered.stop and "\nUser:" in rendered.stop


def test_limamono_renders_trigger_name_first_and_scenario_last() -> None:
    scene = Scene(
        characters=(Character("Charlotte", "Age: 19\nA knight of the realm."),),
        user=Character("Mark"),
        scenario="Mark meets Charlotte at the gate.",
        turns=(Turn("Charlotte", "Halt!"), Turn("Mark", "I come in peace.", length="tiny")),
    )
    text = get_format("limamono").render(scene, "Charlotte", length="long").text
    assert text == (
        "Below is an instruction that describes background information for a story-rich chat. "
        "Write an appropriate response for both the instruction and user input.\n"
        "### Instruction:\nCharlotte\nAge: 19\nA knight of the realm.\n"
        "Scenario: Mark meets Charlotte at the gate.\n"
        "### Response:\nCharlotte: Halt!\n"
        "### Input: (length = tiny)\nMark: I come in peace.\n"
        "### Response: (length = long)\nCharlotte:"
    )


def test_instruct_formats_golden() -> None:
    scene = Scene(
        characters=(Character("Ann", "A baker."),),
        user=Character("Bo"),
        turns=(Turn("Bo", "Hi."), Turn("Ann", "Hello."), Turn("Bo", "Bread?")),
    )
    assert get_format("mistral").render(scene, "Ann").text == (
        "<s>[INST] Ann's Persona: A baker.\n\nBo: Hi. [/INST] Ann: Hello.</s>"
        "[INST] Bo: Bread? [/INST] Ann:"
    )
    assert get_format("chatml").render(scene, "Ann").text == (
        "<|im_start|>system\nAnn's Persona: A baker.<|im_end|>\n"
        "<|im_start|>user\nBo: Hi.<|im_end|>\n"
        "<|im_start|>assistant\nAnn: Hello.<|im_end|>\n"
        "<|im_start|>user\nBo: Bread?<|im_end|>\n"
        "<|im_start|>assistant\nAnn:"
    )
    assert get_format("llama3").render(scene, "Ann").text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnn's Persona: A baker."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBo: Hi.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnn: Hello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBo: Bread?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnn:"
    )
    # the tiny tokenizer's template is ChatML, so the chat_template format matches chatml
    tokenizer = tiny_tokenizer()
    assert (
        get_format("chat_template").render(scene, "Ann", tokenizer=tokenizer).text
        == get_format("chatml").render(scene, "Ann").text
    )


def test_chat_completion_is_a_chat_request_without_names() -> None:
    """What a chat-completion request without speaker names sends, token for token as
    ``steer serve`` encodes its messages; the character's words are still labelled hers."""
    scene = Scene(
        characters=(Character("Ann", "A baker."),),
        user=Character("Bo"),
        turns=(Turn("Bo", "Hi."), Turn("Ann", "Hello."), Turn("Bo", "Bread?")),
    )
    tokenizer = tiny_tokenizer()
    rendered = get_format("chat_completion").render(scene, "Ann", tokenizer=tokenizer)
    assert rendered.text == (
        "<|im_start|>system\nAnn's Persona: A baker.<|im_end|>\n"
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBread?<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        Message("system", "Ann's Persona: A baker."),
        Message("user", "Hi."),
        Message("assistant", "Hello."),
        Message("user", "Bread?"),
    ]
    tokens = tokenize(tokenizer, rendered)
    assert list(tokens.ids) == encode_messages(tokenizer, messages)
    words = {"Ann": "Hello.", "Bo": "Hi. Bread?"}
    for (start, end), speaker in zip(
        tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ],
        tokens.speakers,
        strict=True,
    ):
        if speaker is not None:
            assert rendered.text[start:end].strip() in words[speaker]
    assert "Ann" in tokens.speakers and tokens.speakers[-1] is None


def test_user_template_format() -> None:
    custom = register(
        TemplateFormat(
            name="plain-test",
            preamble="{char} and {user}. {scenario}\n",
            user_message="> {name}: {content}\n",
            char_message="{name}: {content}\n",
            reply="{name}:",
            stop=("\n>",),
        )
    )
    scene = Scene(
        characters=(Character("Ann"),),
        user=Character("Bo"),
        scenario="A shop.",
        turns=(Turn("Bo", "Hi."),),
    )
    rendered = custom.render(scene, "Ann")
    assert rendered.text == "Ann and Bo. A shop.\n> Bo: Hi.\nAnn:"
    assert rendered.stop == ("\n>", "\nBo:")
    with pytest.raises(InvalidArgumentError) as error:
        TemplateFormat(name="bad", reply="{nmae}:")
    assert error.value.field == "reply"
    FORMATS.pop("plain-test")


@pytest.mark.parametrize("name", ["alpaca", "limamono", "shorirp", "chatml", "mistral", "llama3"])
def test_every_token_gets_the_speaker_of_its_message(name: str) -> None:
    tokenizer = tiny_tokenizer()
    rendered = get_format(name).render(GENSOKYO, "Marisa", tokenizer=tokenizer)
    tokens = tokenize(tokenizer, rendered)
    assert len(tokens.ids) == len(tokens.speakers)
    assert set(tokens.speakers) == {None, "Reimu", "Marisa"}
    text = rendered.text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for (start, end), speaker in zip(offsets["offset_mapping"], tokens.speakers, strict=True):
        piece = text[start:end].strip()
        if speaker == "Reimu":
            assert piece in 'Reimu: "Hmm... I wonder what\'s going on?" Reimu mused.'
        if speaker is None and piece:
            # nobody's tokens never carry message words
            assert "Ooohh" not in piece and "wonder" not in piece
    # the last tokens ("Marisa:") start the reply and belong to her
    assert tokens.speakers[-1] == "Marisa"


def test_bad_scene_and_render_arguments_name_their_field() -> None:
    with pytest.raises(InvalidArgumentError) as error:
        Scene(characters=(Character("Ann"),), turns=(Turn("Zed", "hi"),))
    assert error.value.field == "turns"
    with pytest.raises(InvalidArgumentError) as error:
        get_format("shorirp").render(GENSOKYO, "Reimu", length="gigantic")
    assert error.value.field == "length"
    with pytest.raises(InvalidArgumentError) as error:
        get_format("alpaca").render(GENSOKYO, "Chen")
    assert error.value.field == "speaker"
    with pytest.raises(InvalidArgumentError) as error:
        get_format("nope")
    assert error.value.field == "format"
    with pytest.raises(InvalidArgumentError) as error:
        Turn("Ann", "x", kind="aside")
    assert error.value.field == "kind"


# -- cards --------------------------------------------------------------------------------------

V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphine",
        "description": "{{char}} is a lighthouse keeper who distrusts {{user}}.",
        "personality": "gruff",
        "scenario": "<USER> arrives in a storm.",
        "first_mes": "Who sent you, {{user}}?",
        "mes_example": "<START>\n{{user}}: hi\n{{char}}: go away",
        "system_prompt": "Stay in character as {{char}}.",
        "creator_notes": "",
        "tags": [],
    },
}


def test_v2_json_card_with_substitution() -> None:
    character = card_from_json(V2).with_user("Tomas")
    assert character.name == "Seraphine"
    assert character.description == "Seraphine is a lighthouse keeper who distrusts Tomas."
    assert character.scenario == "Tomas arrives in a storm."
    assert character.first_message == "Who sent you, Tomas?"
    assert character.example_dialogue == "<START>\nTomas: hi\nSeraphine: go away"
    assert character.system_prompt == "Stay in character as Seraphine."
    assert substitute("{{ Char }} / {{USER}}", "A", "B") == "A / B"
    v1 = {"name": "Old", "description": "v1 card", "first_mes": "hey"}
    assert card_from_json(v1).first_message == "hey"


def test_png_card_built_here_parses_back(tmp_path: Path) -> None:
    character = card_from_json(V2)
    path = tmp_path / "seraphine.png"
    blob = write_png_card(character, path)
    assert blob.startswith(PNG_SIGNATURE)
    assert read_card(path) == character
    assert read_card(blob) == character
    json_path = tmp_path / "card.json"
    json_path.write_text(json.dumps(card_to_json(character)))
    assert read_card(json_path) == character


def test_png_card_in_an_itxt_chunk() -> None:
    import struct

    payload = base64.b64encode(json.dumps(V2).encode())
    body = b"chara\0" + b"\0\0" + b"\0" + b"\0" + payload  # keyword, uncompressed, no language

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    blob = PNG_SIGNATURE + chunk(b"iTXt", body) + chunk(b"IEND", b"")
    assert read_card(blob).name == "Seraphine"


def test_bad_cards_raise_typed_errors(tmp_path: Path) -> None:
    blob = bytearray(write_png_card(Character("Ann")))
    blob[40] ^= 0xFF  # corrupt a byte inside a chunk: the CRC no longer matches
    with pytest.raises(InvalidArgumentError):
        read_card(bytes(blob))
    plain_png = PNG_SIGNATURE + write_png_card(Character("Ann"))[8:33]  # IHDR only
    with pytest.raises(InvalidArgumentError):
        read_card(plain_png)
    with pytest.raises(InvalidArgumentError) as error:
        card_from_json({"spec": "chara_card_v2", "data": {"name": ""}})
    assert error.value.field == "card.name"
    with pytest.raises(InvalidArgumentError) as error:
        card_from_json({"spec": "chara_card_v2", "data": {"name": "A", "description": 3}})
    assert error.value.field == "card.description"
    with pytest.raises(InvalidArgumentError):
        read_card(tmp_path / "missing.png")


# -- presets and scenarios ----------------------------------------------------------------------


def test_presets_hold_the_seed_settings(tmp_path: Path) -> None:
    last = preset_config("temperature-last")
    assert (last.temperature, last.min_p, last.temperature_last) == (2.4, 0.4, True)
    mirostat = preset_config("mirostat", seed=3)
    assert (mirostat.mirostat_mode, mirostat.mirostat_tau, mirostat.mirostat_eta) == (
        2,
        3.0,
        0.0175,
    )
    assert mirostat.seed == 3
    limarp = preset_config("limarp")
    assert (limarp.tfs, limarp.temperature, limarp.repetition_penalty) == (0.9, 0.5, 1.15)
    assert limarp.repetition_penalty_range == 512
    assert all(preset_config(name) is not None for name in PRESETS)
    toml = tmp_path / "mine.toml"
    toml.write_text("[sampling]\ntemperature = 0.7\ndry_multiplier = 0.8\n")
    assert load_preset(str(toml)).dry_multiplier == 0.8
    toml.write_text("[sampling]\ntemprature = 0.7\n")
    with pytest.raises(InvalidArgumentError) as error:
        load_preset(str(toml))
    assert error.value.field == "preset"
    with pytest.raises(NotFoundError):
        load_preset("no-such-preset")


def test_project_scenarios_load() -> None:
    scenarios = load_scenarios()
    assert len(scenarios) >= 10
    assert len({s.id for s in scenarios}) == len(scenarios)
    assert any(len(s.scene.characters) > 1 for s in scenarios)
    for scenario in scenarios:
        assert "{{" not in scenario.scene.characters[0].description
        assert scenario.followups
        assert scenario.tags  # steer eval rp --skip-tags chooses scenes by them
    villain = next(s for s in scenarios if s.id == "villain")
    assert "villain" in villain.tags


def test_eval_rp_direction_specs() -> None:
    from steer.cli.eval_rp import parse_direction

    assert parse_direction("dirs/moral") == ("dirs/moral", None, None)
    assert parse_direction("dirs/moral:-2.5") == ("dirs/moral", -2.5, None)
    assert parse_direction("dirs/vain:4@Lysa") == ("dirs/vain", 4.0, "Lysa")
    assert parse_direction("dirs/moral@Lysa") == ("dirs/moral", None, "Lysa")
    for bad in ("dirs/x:strong", "dirs/x@"):
        with pytest.raises(InvalidArgumentError) as error:
            parse_direction(bad)
        assert error.value.field == "direction"
