"""Gated edits in recipes (`[edits.gate]`): run as Gated built by hand, round-trip, bad fields."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import random_vector

from steer import Ablate, Add, Condition, Gated, GateScope, InvalidArgumentError
from steer.activations import forward
from steer.artifacts import load_vector, save_vector
from steer.interventions import Intervention
from steer.models import ModelHandle
from steer.recipes import EditGate, load_edit_recipe, parse_edit_recipe, recipe_to_toml

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ("The quick brown fox jumps over the lazy dog.", "How do I bake bread at home?")


def _ids(handle: ModelHandle) -> list[list[int]]:
    return [list(handle.tokenizer(p)["input_ids"]) for p in PROMPTS]


def _logits(handle: ModelHandle, interventions: list[Intervention]) -> list[torch.Tensor]:
    result = forward(handle, _ids(handle), interventions=interventions, logits="all").logits
    assert isinstance(result, list)
    return result


def _median_projection(handle: ModelHandle, direction: Path) -> float:
    """A threshold that fires on about half the tokens at HOOK."""
    residual = forward(handle, _ids(handle), hooks=[HOOK], positions="all").activations[HOOK]
    assert isinstance(residual, list)
    vector = load_vector(direction).vector.at(1)
    return float((torch.cat(residual) @ (vector / vector.norm())).median())


@pytest.fixture
def artifacts(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    layers, d_model = tiny_llama.num_layers, tiny_llama.d_model
    return {
        "vector": save_vector(
            tmp_path / "vector", random_vector(3, layers, d_model) * 4.0, handle=tiny_llama
        ),
        "direction": save_vector(
            tmp_path / "direction", random_vector(1, layers, d_model), handle=tiny_llama
        ),
        "condition": save_vector(
            tmp_path / "condition", random_vector(7, layers, d_model), handle=tiny_llama
        ),
    }


def _recipe_text(edit: str, threshold: float, scope: str, below: bool = False) -> str:
    return f"""
name = "gated"

[[edits]]
{edit}

[edits.gate]
hook = "{HOOK}"
direction = "condition"
threshold = {threshold!r}
below = {"true" if below else "false"}
scope = "{scope}"
"""


ADD = 'kind = "add"\nvector = "vector"\nstrength = 1.5\nhooks = ["blocks.2.hook_resid_post"]'
ABLATE = 'kind = "ablate"\ndirection = "direction"\nweight = 1.0'


# forward() refuses reply gates; tests/test_gates_reply.py runs them through the engine
@pytest.mark.parametrize("scope", [GateScope.TOKEN, GateScope.PROMPT])
@pytest.mark.parametrize("below", [False, True])
def test_a_gated_add_recipe_runs_as_the_gated_built_by_hand(
    tiny_llama: ModelHandle, artifacts: dict[str, Path], scope: GateScope, below: bool
) -> None:
    handle = tiny_llama
    threshold = _median_projection(handle, artifacts["condition"])
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ADD, threshold, scope.value, below))
    recipe = load_edit_recipe(path)
    condition = Condition(HOOK, load_vector(artifacts["condition"]).vector, threshold, below)
    inner = Add(load_vector(artifacts["vector"]).vector, 1.5, ("blocks.2.hook_resid_post",))
    by_hand = Gated(condition, inner, scope)
    from_recipe = recipe.lowered(handle.num_layers)
    assert len(from_recipe) == 1 and isinstance(from_recipe[0], Gated)
    ours, theirs = _logits(handle, from_recipe), _logits(handle, [by_hand])
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    # the gate matters: it fires on some tokens (or rows) and not on others
    plain, ungated = _logits(handle, []), _logits(handle, [inner])
    assert any(not torch.equal(a, b) for a, b in zip(ours, plain, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ours, ungated, strict=True))


def test_a_gated_ablation_gates_each_of_its_interventions(
    tiny_llama: ModelHandle, artifacts: dict[str, Path]
) -> None:
    handle = tiny_llama
    threshold = _median_projection(handle, artifacts["condition"])
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ABLATE, threshold, "prompt"))
    recipe = load_edit_recipe(path)
    lowered = recipe.lowered(handle.num_layers)
    assert all(isinstance(i, Gated) and i.scope is GateScope.PROMPT for i in lowered)
    inner = [i.inner for i in lowered if isinstance(i, Gated)]
    assert all(isinstance(i, Ablate) for i in inner)
    condition = Condition(HOOK, load_vector(artifacts["condition"]).vector, threshold)
    by_hand = [Gated(condition, i, GateScope.PROMPT) for i in inner]
    for a, b in zip(_logits(handle, lowered), _logits(handle, by_hand), strict=True):
        assert torch.equal(a, b)


def test_a_gated_recipe_round_trips_through_toml(artifacts: dict[str, Path]) -> None:
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ADD, -0.25, "prompt", below=True))
    recipe = load_edit_recipe(path)
    assert recipe.edits[0].gate == EditGate(HOOK, "condition", -0.25, True, GateScope.PROMPT)
    assert recipe.resolve("condition") in recipe.artifact_paths()
    text = recipe_to_toml(recipe)
    assert "[edits.gate]" in text
    again = load_edit_recipe(text)
    gate = again.edits[0].gate
    assert gate is not None
    assert gate == EditGate(HOOK, str(recipe.resolve("condition")), -0.25, True, GateScope.PROMPT)
    assert recipe_to_toml(again) == text


def test_a_reply_gate_keeps_its_window_through_toml(
    tiny_llama: ModelHandle, artifacts: dict[str, Path]
) -> None:
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ADD, 0.5, "reply") + "reply_tokens = 6\n")
    recipe = load_edit_recipe(path)
    gate = recipe.edits[0].gate
    assert gate is not None and gate.scope is GateScope.REPLY and gate.reply_tokens == 6
    again = load_edit_recipe(recipe_to_toml(recipe))
    assert again.edits[0].gate is not None and again.edits[0].gate.reply_tokens == 6
    (lowered,) = again.lowered(tiny_llama.num_layers)
    assert isinstance(lowered, Gated) and lowered.reply_tokens == 6
    # without the key a reply gate reads the default window; other scopes write no key
    path.write_text(_recipe_text(ADD, 0.5, "reply"))
    (default,) = load_edit_recipe(path).lowered(tiny_llama.num_layers)
    assert isinstance(default, Gated) and default.reply_tokens == 4
    assert "reply_tokens" not in recipe_to_toml(load_edit_recipe(_recipe_text(ADD, 0.5, "token")))


def test_a_mean_reply_gate_keeps_its_aggregate_through_toml(
    tiny_llama: ModelHandle, artifacts: dict[str, Path]
) -> None:
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ADD, 0.5, "reply") + 'reply_aggregate = "mean"\n')
    again = load_edit_recipe(recipe_to_toml(load_edit_recipe(path)))
    assert again.edits[0].gate is not None and again.edits[0].gate.reply_aggregate == "mean"
    (lowered,) = again.lowered(tiny_llama.num_layers)
    assert isinstance(lowered, Gated) and lowered.reply_aggregate == "mean"
    # an aggregate the library does not know, or one on a prompt gate, names the field
    for scope, value in (("reply", "median"), ("prompt", "mean")):
        path.write_text(_recipe_text(ADD, 0.5, scope) + f'reply_aggregate = "{value}"\n')
        with pytest.raises(InvalidArgumentError) as raised:
            load_edit_recipe(path).lowered(tiny_llama.num_layers)
        assert raised.value.field == "edits[0].gate.reply_aggregate"


def _edit(**gate: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"hook": HOOK, "direction": "condition", "threshold": 1.0} | gate
    return {"edits": [{"kind": "add", "vector": "v", "layers": [1], "gate": table}]}


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ({"threshold": "high"}, "edits[0].gate.threshold"),
        ({"threshold": math.nan}, "edits[0].gate.threshold"),
        ({"threshold": math.inf}, "edits[0].gate.threshold"),
        ({"scope": "sometimes"}, "edits[0].gate.scope"),
        ({"below": 1}, "edits[0].gate.below"),
        ({"hook": ""}, "edits[0].gate.hook"),
        ({"direction": 3}, "edits[0].gate.direction"),
        ({"colour": "red"}, "edits[0].gate.colour"),
        ({"scope": "reply", "reply_tokens": "four"}, "edits[0].gate.reply_tokens"),
        ({"scope": "reply", "reply_tokens": True}, "edits[0].gate.reply_tokens"),
        ({"scope": "reply", "reply_aggregate": 2}, "edits[0].gate.reply_aggregate"),
    ],
)
def test_malformed_gate_tables_name_the_field(gate: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        parse_edit_recipe(_edit(**gate))
    assert raised.value.field == field


@pytest.mark.parametrize("missing", ["hook", "direction", "threshold"])
def test_a_gate_without_a_required_key_names_it(missing: str) -> None:
    data = _edit()
    del data["edits"][0]["gate"][missing]
    with pytest.raises(InvalidArgumentError) as raised:
        parse_edit_recipe(data)
    assert raised.value.field == f"edits[0].gate.{missing}"


def test_a_gate_that_is_not_a_table_is_refused() -> None:
    data = _edit()
    data["edits"][0]["gate"] = 1.0
    with pytest.raises(InvalidArgumentError) as raised:
        parse_edit_recipe(data)
    assert raised.value.field == "edits[0].gate"


def test_a_gate_hook_outside_the_model_names_the_field(
    tiny_llama: ModelHandle, artifacts: dict[str, Path]
) -> None:
    path = artifacts["vector"].parent / "gated.toml"
    path.write_text(_recipe_text(ADD, 0.0, "token").replace(HOOK, "blocks.99.hook_resid_post"))
    with pytest.raises(InvalidArgumentError) as raised:
        load_edit_recipe(path).lowered(tiny_llama.num_layers)
    assert raised.value.field == "edits[0].gate.hook"


def test_eval_rp_edits_play_a_gated_recipe_per_reply(
    tiny_llama: ModelHandle, artifacts: dict[str, Path]
) -> None:
    """``steer eval rp --edits``: a prompt gate that never fires plays the scenarios exactly as
    no edit; one that always fires (below a huge threshold) as the edit ungated."""
    from steer.cli.eval_rp import _interventions
    from steer.rp.evaluate import EvalSettings, evaluate_rp, load_scenarios
    from steer.sampling import SamplingConfig

    handle, scenarios = tiny_llama, load_scenarios()[:2]
    settings = EvalSettings(sampling=SamplingConfig(min_p=0.1), max_new_tokens=6, rounds=2)

    def play(text: str | None) -> dict[str, Any]:
        path = None
        if text is not None:
            path = artifacts["vector"].parent / "rp.toml"
            path.write_text(text)
        edits = _interventions(handle, [], None if path is None else str(path))
        return evaluate_rp(handle, replace(settings, interventions=edits), scenarios)

    ungated = f'name = "plain"\n\n[[edits]]\n{ADD}\n'
    plain, edited = play(None), play(ungated)
    assert plain != edited
    assert play(_recipe_text(ADD, 1e6, "prompt")) == plain
    assert play(_recipe_text(ADD, 1e6, "prompt", below=True)) == edited
