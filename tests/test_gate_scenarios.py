"""A gate calibrated on played RP scenes too (data.gate_scenarios), on a tiny model.

Each scene is split whole, by its tags, and every reply's prompt is the one ``steer eval rp``
sent for it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from gate_setup import gate_setup, run_gate

from steer import InvalidArgumentError, NotFoundError
from steer.directions.gate_scenarios import (
    MAX_NEW_TOKENS,
    PRESET,
    ROUNDS,
    played_prompts,
    scenario_splits,
)
from steer.directions.preflight import check_data
from steer.directions.recipe import load_direction_recipe
from steer.directions.scene_forms import SCENE_FORMS, scene_tokens
from steer.models import ModelHandle
from steer.rp.evaluate import EvalSettings, load_scenarios, play, played_turns, reply_prompt
from steer.rp.presets import load_preset

HOOK = "blocks.1.hook_resid_pre"
WORDS = ("bread", "weather", "harbour", "festival", "garden", "moon", "sea", "rain")


def _scene(index: int, tags: list[str]) -> dict[str, object]:
    name, word = ("Vex" if "villain" in tags else "Bram"), WORDS[index % len(WORDS)]
    return {
        "id": f"s{index}",
        "title": f"Scene {index}",
        "tags": tags,
        "characters": [{"name": name, "description": "{{char}} keeps the " + word + "."}],
        "user": {"name": "Ana"},
        "turns": [
            {"speaker": name, "content": f'"The {word} again?"'},
            {"speaker": "Ana", "content": f'"Tell me about the {word}."'},
        ],
        "followups": [f'"And after the {word}?"', '"Go on."'],
    }


def _write(path: Path, scenes: list[dict[str, object]]) -> Path:
    comment = "# scenes for a test\n"
    path.write_text(comment + "\n".join(json.dumps(scene) for scene in scenes) + "\n")
    return path


@pytest.fixture
def setup(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    tags = (["villain"], ["crime", "noir"], ["comedy"], ["dark comedy"], ["slice of life"])
    first = _write(tmp_path / "a.jsonl", [_scene(i, tags[i % 5]) for i in range(10)])
    second = _write(tmp_path / "b.jsonl", [_scene(i, tags[i % 5]) for i in range(10, 20)])
    prompts = tmp_path / "fire.txt"
    prompts.write_text("\n".join(f"Tell me how to rob the {w}." for w in WORDS) + "\n")
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("\n".join(f"Write a poem about the {w}." for w in WORDS) + "\n")
    return gate_setup(
        tiny_llama,
        tmp_path,
        f'positive = "{prompts}"\nnegative = "{harmless}"\n'
        f'gate_scenarios = ["{first.name}", "{second.name}"]\n'
        "filter = false\ntrain = 0.5\nvalidation = 0.3\n",
    )


def test_scenes_split_whole_by_their_tags(setup: dict[str, Path]) -> None:
    """A trigger-tagged scene joins the fire side, any other the quiet side; each file's side is
    split apart and joined in order; no scene lands in two splits; one file == a list of one."""
    recipe = load_direction_recipe(setup["recipe"])
    splits = scenario_splits(recipe)
    parts = ("train", "validation", "test")
    fire = [s.id for part in parts for s in getattr(splits["fire"], part)]
    quiet = [s.id for part in parts for s in getattr(splits["quiet"], part)]
    assert sorted(fire + quiet) == sorted(f"s{i}" for i in range(20))  # each scene once
    assert sorted(fire, key=lambda s: int(s[1:])) == [
        f"s{i}" for i in range(20) if i % 5 in (0, 1, 3)
    ]
    assert all(len(splits[side].train) >= 2 for side in splits)
    first_file = {f"s{i}" for i in range(10)}
    train = [s.id for s in splits["quiet"].train]
    assert train == sorted(train, key=lambda s: s not in first_file)  # file a's, then b's
    one = setup["recipe"].read_text().replace('["a.jsonl", "b.jsonl"]', '"a.jsonl"')
    setup["recipe"].write_text(one)
    alone = scenario_splits(load_direction_recipe(setup["recipe"]))
    listed = setup["recipe"].read_text().replace('"a.jsonl"', '["a.jsonl"]')
    setup["recipe"].write_text(listed)
    assert scenario_splits(load_direction_recipe(setup["recipe"])) == alone


def test_a_bad_scenario_file_names_its_place(setup: dict[str, Path]) -> None:
    text = setup["recipe"].read_text()
    setup["recipe"].write_text(text.replace('"b.jsonl"', '"missing.jsonl"'))
    with pytest.raises(NotFoundError) as missing:
        check_data(load_direction_recipe(setup["recipe"]))
    assert missing.value.field == "data.gate_scenarios[1]"
    (setup["recipe"].parent / "bad.jsonl").write_text('{"id": "x", "characters": 3}\n')
    setup["recipe"].write_text(text.replace('"b.jsonl"', '"bad.jsonl"'))
    with pytest.raises(InvalidArgumentError):
        check_data(load_direction_recipe(setup["recipe"]))


def test_played_prompts_are_the_prompts_play_sent(
    tiny_llama: ModelHandle, setup: dict[str, Path]
) -> None:
    """Every reply's prompt, in each form: the first is the scene as written (the prompt play
    reports), the later ones hold the reply before them, cut as play keeps it, and the user's
    scripted follow-up."""
    scenes = load_scenarios(setup["recipe"].parent / "a.jsonl")[:3]
    prompts = played_prompts(tiny_llama, scenes, SCENE_FORMS)
    assert len(prompts) == len(scenes) * ROUNDS * len(SCENE_FORMS)
    settings = EvalSettings(
        sampling=replace(load_preset(PRESET), seed=None),
        max_new_tokens=MAX_NEW_TOKENS,
        rounds=ROUNDS,
    )
    transcripts = play(tiny_llama, scenes, settings)
    for index, (scenario, transcript) in enumerate(zip(scenes, transcripts, strict=True)):
        turns = played_turns(scenario, transcript.replies)
        assert reply_prompt(tiny_llama, turns[0][0], turns[0][1])[0].text == transcript.prompt
        later = turns[1][0]
        assert later.turns[-1].content == scenario.followups[0]
        assert later.turns[-2].content == transcript.replies[0].strip()
        own = prompts[index * ROUNDS * 2 : (index + 1) * ROUNDS * 2]
        expected = [scene_tokens(tiny_llama, s, f, who) for s, who in turns for f in SCENE_FORMS]
        assert own == expected
    assert played_prompts(tiny_llama, [], SCENE_FORMS) == []


def test_the_gate_counts_the_played_scenes(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``steer directions gate`` calibrates and reports on the played scenes too: each side's
    counts grow by (its scenes) x rounds x forms over the same recipe without them."""

    def kept() -> dict[str, dict[str, int]]:
        code = run_gate(setup, "--hooks", HOOK, "--condition", "direction", "--target-fpr", "0.2")
        assert code == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"]

    splits = scenario_splits(load_direction_recipe(setup["recipe"]))
    with_scenes = kept()
    text = setup["recipe"].read_text()
    setup["recipe"].write_text(text.replace('gate_scenarios = ["a.jsonl", "b.jsonl"]\n', ""))
    without = kept()
    per_scene = ROUNDS * len(SCENE_FORMS)
    for part in ("train", "validation"):
        for side, count in (("fire", "fire_count"), ("quiet", "quiet_count")):
            added = len(getattr(splits[side], part)) * per_scene
            assert with_scenes[part][count] == without[part][count] + added, (part, side)
