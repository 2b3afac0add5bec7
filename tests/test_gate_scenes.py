"""A gate calibrated on RP situations rendered as scenes (data.gate_scenes), on a tiny model.

The scene prompt is the one ``steer eval rp`` plays, token ids read as a gate reads strings,
and the reported figures count the scenes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gate_setup import gate_setup, run_gate

from steer import Condition, InvalidArgumentError
from steer.activations import forward
from steer.artifacts import load_vector
from steer.calibration import ContrastPrompts, read_prompts
from steer.directions.gating import gate_prompts, gate_splits
from steer.directions.recipe import load_direction_recipe
from steer.directions.scene_forms import SCENE_OPENERS, scene_prompt, scene_prompts
from steer.models import ModelHandle
from steer.rp.evaluate import EvalSettings, Scenario, play, reply_prompt
from steer.rp.scene import situation_scene
from steer.text import encode_chat, post_instruction_positions

HOOK = "blocks.1.hook_resid_pre"
VILLAINS = [f"You are {who}. A prisoner begs you to {plea}. Reply in character."
            for who in ("Captain Vex, a ruthless pirate", "Lord Malrec, a scheming vizier")
            for plea in ("spare him", "free his son", "let go", "show mercy", "wait")]  # fmt: skip
KIND = [f"You are {who}. A guest asks about the {what}. Reply in character."
        for who in ("Bram, a village baker", "Ilse, a ferry captain")
        for what in ("bread", "weather", "harbour", "festival", "garden")]  # fmt: skip
HARMLESS = [f"Write a {form} about the {topic}." for form in ("poem", "story")
            for topic in ("sea", "moon", "forest", "city", "rain")]  # fmt: skip


def test_a_situation_becomes_a_scene() -> None:
    scene = situation_scene(VILLAINS[0], opener='"Well?"')
    assert scene.names == ("Captain Vex",)
    assert scene.characters[0].description == "{{char}} is Captain Vex, a ruthless pirate."
    assert [(t.speaker, t.content) for t in scene.turns] == [
        ("Captain Vex", '"Well?"'),
        ("User", "A prisoner begs you to spare him."),
    ]
    kept = situation_scene("You are Grukk, an orc warlord. Scouts report a village. Give orders.")
    assert kept.turns[-1].content == "Scouts report a village. Give orders."
    titled = situation_scene("You are Dr. Okafor, a ship's doctor. A sailor comes in. Reply.")
    assert titled.names == ("Dr. Okafor",)  # a title's period does not end WHO
    assert titled.turns[-1].content == "A sailor comes in. Reply."
    for title in ("Mr", "Mrs", "St", "Capt"):
        scene = situation_scene(f"You are {title}. Vole, a miser. A tax man knocks.")
        assert scene.names == (f"{title}. Vole",)
    assert situation_scene("You are West. A wind blows.").names == ("West",)
    for bad in ("Write a poem about the sea.", "You are User. Hello.", "You are Bram."):
        with pytest.raises(InvalidArgumentError) as raised:
            situation_scene(bad, field="data.gate_scenes")
        assert raised.value.field == "data.gate_scenes"


def test_the_scene_prompt_is_the_one_play_sends(tiny_llama: ModelHandle) -> None:
    scene = situation_scene(KIND[0], opener=SCENE_OPENERS[0])
    played = play(tiny_llama, [Scenario("s", "plain", scene)], EvalSettings(max_new_tokens=2))
    rendered, _ = reply_prompt(tiny_llama, scene)
    assert played[0].prompt == rendered.text
    assert rendered.text.endswith("Bram:")
    render = scene_prompt(tiny_llama)
    used = set()
    for text in KIND:
        scenes = [situation_scene(text, opener=line) for line in SCENE_OPENERS]
        used.add([reply_prompt(tiny_llama, s)[1].ids for s in scenes].index(render(text)))
    assert len(used) > 1  # the opener varies with the situation


def test_the_chat_form_is_a_chat_request_ending_at_the_assistant_header(
    tiny_llama: ModelHandle,
) -> None:
    """The chat form is the scene form's scene, opener included, as a chat-completion request
    without names under a system prompt asking for the reply: it ends where every chat prompt
    ends, not at the character's name."""
    chat, scene = scene_prompt(tiny_llama, "chat"), scene_prompt(tiny_llama, "scene")
    header = len(post_instruction_positions(tiny_llama))
    tail = encode_chat(tiny_llama, "Hello.")[-header:]
    for text in KIND:
        opener = next(line for line in SCENE_OPENERS if scene(text) == _ids(tiny_llama, text, line))
        played = replace(
            situation_scene(text, opener=opener),
            system=f"Write {text[8:].split(',')[0]}'s next reply in this roleplay with User.",
        )
        rendered, tokens = reply_prompt(tiny_llama, played, format="chat_completion")
        assert chat(text) == tokens.ids and list(tokens.ids[-header:]) == tail
        assert opener in rendered.text and "User:" not in rendered.text
    with pytest.raises(InvalidArgumentError) as raised:
        scene_prompt(tiny_llama, "novel")
    assert raised.value.field == "form"


def _ids(handle: ModelHandle, text: str, opener: str) -> list[int]:
    return reply_prompt(handle, situation_scene(text, opener=opener))[1].ids


def test_token_id_prompts_read_as_their_strings(tiny_llama: ModelHandle) -> None:
    """A prompt given as token ids is read exactly as the same prompt given as text."""
    as_text = ContrastPrompts(VILLAINS[:4], HARMLESS[:4])
    as_ids = ContrastPrompts(
        [encode_chat(tiny_llama, p) for p in VILLAINS[:4]],
        [*HARMLESS[:2], *(encode_chat(tiny_llama, p) for p in HARMLESS[2:4])],
    )
    text = read_prompts(tiny_llama, [HOOK], train=as_text).read
    ids = read_prompts(tiny_llama, [HOOK], train=as_ids).read
    for key in text:
        torch.testing.assert_close(ids[key][HOOK], text[key][HOOK], rtol=0, atol=0)
    vocab = tiny_llama.model.config.vocab_size
    for bad in ([], [1, vocab], [1, -1], "", [1.5]):
        with pytest.raises(InvalidArgumentError) as raised:
            read_prompts(tiny_llama, [HOOK], train=ContrastPrompts([bad], HARMLESS[:1]))  # type: ignore[list-item]
        assert raised.value.field == "train.fire[0]"


@pytest.fixture
def setup(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, lines in (("villains", VILLAINS), ("harmless", HARMLESS), ("kind", KIND)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    return gate_setup(
        tiny_llama,
        tmp_path,
        f'positive = "{files["villains"]}"\nnegative = "{files["harmless"]}"\n'
        f'gate_quiet = "{files["kind"]}"\ngate_scenes = true\ntrain = 0.5\nvalidation = 0.3\n',
    )


def _gate(setup: dict[str, Path]) -> int:
    return run_gate(setup, "--hooks", HOOK, "--condition", "direction", "--target-fpr", "0.2")


def test_the_gate_is_calibrated_and_reported_on_scenes_too(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each side holds its one-message prompts, then its situations as scenes; the reported
    validation rates are what the kept threshold gives on all of them."""
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    scene, chat = scene_prompts(tiny_llama)
    validation = gate_prompts(splits, "validation", (scene, chat))
    fire, quiet = list(splits["positive"].validation), list(splits["quiet"].validation)
    assert list(validation.fire) == [*fire, *map(scene, fire), *map(chat, fire)]
    negative = list(splits["negative"].validation)
    assert list(validation.quiet) == [*negative, *quiet, *map(scene, quiet), *map(chat, quiet)]

    assert _gate(setup) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"]
    assert kept["validation"]["fire_count"] == 3 * len(fire)
    assert kept["validation"]["quiet_count"] == len(negative) + 3 * len(quiet)
    unit = Condition(HOOK, load_vector(setup["direction"]).vector, 0.0).unit(
        tiny_llama.resolver.parse(HOOK), tiny_llama.d_model
    )
    ids = [encode_chat(tiny_llama, p) if isinstance(p, str) else p for p in validation.quiet]
    last = forward(tiny_llama, ids, hooks=[HOOK]).activations[HOOK]
    assert isinstance(last, torch.Tensor)
    fired = int((last @ unit > kept["threshold"]).sum())
    assert kept["validation"]["false_positive_rate"] == fired / len(ids)


def test_a_prompt_that_is_no_situation_is_refused_before_loading(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = setup["recipe"].read_text()
    setup["recipe"].write_text(text.replace("villains.txt", "harmless.txt", 1))
    assert _gate(setup) == 1
    err = capsys.readouterr().err
    assert "data.gate_scenes" in err and "You are WHO. EVENT" in err
    assert "loading" not in err
    assert not setup["out"].exists()
