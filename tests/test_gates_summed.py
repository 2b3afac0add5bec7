"""Gates over several hooks (a :class:`steer.Condition` with a tuple of hooks): the weighted sum of
the projections decides, at the last hook; a hook weighted 0 changes nothing; the recipe form and
calibration (steer.calibration.summed_scores) give the same gate."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import random_vector

from steer import Add, Condition, Gated, GateScope, InvalidArgumentError, Phase, SteeringVector
from steer.activations import forward
from steer.artifacts import save_vector
from steer.calibration import ContrastPrompts, gate_scores, summed_scores
from steer.generation import Engine, GenerationRequest
from steer.models import ModelHandle
from steer.recipes import EditGate, load_edit_recipe, parse_edit_recipe, recipe_to_toml
from steer.sampling import SamplingConfig
from steer.text import encode_chat

FIRST = "blocks.0.hook_resid_post"
MIDDLE = "blocks.1.hook_resid_post"
SECOND = "blocks.2.hook_resid_post"
PROMPTS = ("The quick brown fox", "How do I bake bread at home?")
BASE = GenerationRequest(sampling=SamplingConfig.greedy_config(), max_new_tokens=8, top_logprobs=5)


def _direction(handle: ModelHandle) -> SteeringVector:
    """Different vectors at layers 0 and 2: each hook must read its own layer's."""
    generator = torch.Generator().manual_seed(7)
    return SteeringVector(
        per_layer={layer: torch.randn(handle.d_model, generator=generator) for layer in (0, 2)}
    )


def _unit(direction: SteeringVector, layer: int) -> torch.Tensor:
    vector = direction.at(layer)
    return vector / vector.norm()


def _added(handle: ModelHandle, hooks: tuple[str, ...], phase: Phase = Phase.ALL) -> Add:
    generator = torch.Generator().manual_seed(3)
    vector = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * 4.0)
    return Add(vector, 1.0, hooks, phase)


def _summed(handle: ModelHandle, ids: list[list[int]], weights: tuple[float, float]) -> list:  # type: ignore[type-arg]
    """Independently of steer.gates: per prompt, per token, w0 (x_FIRST . u0) + w2 (x_SECOND .
    u2)."""
    reads = forward(handle, ids, hooks=[FIRST, SECOND], positions="all").activations
    direction = _direction(handle)
    return [
        weights[0] * (first @ _unit(direction, 0)) + weights[1] * (second @ _unit(direction, 2))
        for first, second in zip(reads[FIRST], reads[SECOND], strict=True)
    ]


def test_a_token_gate_over_two_hooks_edits_exactly_where_the_weighted_sum_passes(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    ids = [list(handle.tokenizer(PROMPTS[1])["input_ids"])]
    [summed] = _summed(handle, ids, (0.5, 2.0))
    threshold = float(summed.median())
    fires = summed > threshold
    assert 0 < int(fires.sum()) < len(fires)
    inner = _added(handle, (SECOND,))
    # the hooks out of forward order, with their weights: the condition sorts them itself
    condition = Condition((SECOND, FIRST), _direction(handle), threshold, weights=(2.0, 0.5))
    gated = Gated(condition, inner)
    plain = forward(handle, ids, hooks=[SECOND], positions="all").activations[SECOND][0]
    steered = forward(handle, ids, interventions=(gated,), hooks=[SECOND], positions="all")
    edited = steered.activations[SECOND][0]
    assert isinstance(plain, torch.Tensor) and isinstance(edited, torch.Tensor)
    expected = plain + fires[:, None].float() * inner.vector.at(2)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[~fires], plain[~fires])
    # either hook alone decides differently: both terms count
    for alone in ((0.5, 0.0), (0.0, 2.0)):
        assert not torch.equal(_summed(handle, ids, alone)[0] > threshold, fires)


def _events(handle: ModelHandle, interventions: tuple, batch: int = 1) -> list[list]:  # type: ignore[type-arg]
    """(tokens, top logprobs) of each prompt's greedy reply, at most ``batch`` prompts at once."""
    engine = Engine(handle, max_batch=batch)
    requests = [replace(BASE, prompt=p, interventions=interventions) for p in PROMPTS]
    ids = [engine.submit(request) for request in requests]
    events: dict[str, list] = {request_id: [] for request_id in ids}  # type: ignore[type-arg]
    while engine.has_work:
        for event in engine.step():
            events[event.request_id].append((event.token_ids, event.top_logprobs))
    return [events[request_id] for request_id in ids]


def _tokens(events: list[list]) -> list[list[tuple[int, ...]]]:  # type: ignore[type-arg]
    return [[tokens for tokens, _ in row] for row in events]


def _last(handle: ModelHandle, weights: tuple[float, float]) -> list[float]:
    ids = [list(handle.tokenizer(p)["input_ids"]) for p in PROMPTS]
    return [float(row[-1]) for row in _summed(handle, ids, weights)]


def test_a_hook_weighted_zero_gives_the_one_hook_gate_bit_for_bit(tiny_llama: ModelHandle) -> None:
    handle = tiny_llama
    first, second = _last(handle, (0.0, 1.0))
    inner = _added(handle, (MIDDLE,))  # between the two hooks: the prompt pass runs again
    direction = _direction(handle)
    threshold = (first + second) / 2
    one = Gated(Condition(SECOND, direction, threshold), inner, GateScope.PROMPT)
    two = Gated(
        Condition((FIRST, SECOND), direction, threshold, weights=(0.0, 1.0)),
        inner,
        GateScope.PROMPT,
    )
    reference = _events(handle, (one,), batch=2)
    assert _events(handle, (two,), batch=2) == reference
    assert reference != _events(handle, (), batch=2)  # one of the prompts fired


def test_a_prompt_gate_over_two_hooks_is_decided_per_row_on_the_sum(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    weights = (1.5, -0.5)
    first, second = _last(handle, weights)
    fired = 0 if first > second else 1
    inner = _added(handle, (FIRST,), Phase.GENERATED)  # before the decision
    condition = Condition(
        (FIRST, SECOND), _direction(handle), (first + second) / 2, weights=weights
    )
    gated = Gated(condition, inner, GateScope.PROMPT)
    together = _tokens(_events(handle, (gated,), batch=2))
    plain, always = _tokens(_events(handle, ())), _tokens(_events(handle, (inner,)))
    assert together == _tokens(_events(handle, (gated,)))  # batched == one at a time
    assert together[1 - fired] == plain[1 - fired]
    assert together[fired] == always[fired]
    assert always[fired] != plain[fired]


def test_a_token_gate_cannot_act_before_its_last_hook(tiny_llama: ModelHandle) -> None:
    condition = Condition((FIRST, SECOND), _direction(tiny_llama), 0.0)
    gated = Gated(condition, _added(tiny_llama, (MIDDLE,)))
    with pytest.raises(InvalidArgumentError) as raised:
        Engine(tiny_llama).submit(replace(BASE, prompt="hi", interventions=(gated,)))
    assert raised.value.field == "inner.hooks"
    assert SECOND in raised.value.message


def test_bad_hook_lists_and_weights_name_their_field(tiny_llama: ModelHandle) -> None:
    handle = tiny_llama
    direction = _direction(handle)
    inner = _added(handle, (SECOND,))
    built = [
        ("condition.weights", lambda: Condition((FIRST, SECOND), direction, 0.0, weights=(1.0,))),
        ("condition.weights", lambda: Condition(FIRST, direction, 0.0, weights=(1.0,))),
        ("condition.weights[1]",
         lambda: Condition((FIRST, SECOND), direction, 0.0, weights=(1.0, math.nan))),
        ("condition.hook", lambda: Condition((), direction, 0.0)),
        ("condition.hooks[1]", lambda: Condition((FIRST, 2), direction, 0.0)),  # type: ignore[arg-type]
    ]  # fmt: skip
    for field, factory in built:
        with pytest.raises(InvalidArgumentError) as raised:
            factory()
        assert raised.value.field == field
    lowered = {
        "condition.hooks[1]": [("blocks.2.hook_resid_post", "blocks.2.hook_resid_post"),
                              (FIRST, "blocks.99.hook_resid_post")],
    }  # fmt: skip
    for field, cases in lowered.items():
        for hooks in cases:
            gated = Gated(Condition(hooks, direction, 0.0), inner)
            with pytest.raises(InvalidArgumentError) as raised:
                Engine(handle).submit(replace(BASE, prompt="hi", interventions=(gated,)))
            assert raised.value.field == field


def _recipe(hooks: str, weights: str) -> str:
    return f"""
name = "summed"

[[edits]]
kind = "add"
vector = "vector"
strength = 1.0
hooks = ["{SECOND}"]

[edits.gate]
hooks = {hooks}
weights = {weights}
direction = "condition"
threshold = 0.25
scope = "prompt"
"""


def _artifacts(handle: ModelHandle, directory: Path) -> tuple[SteeringVector, SteeringVector]:
    """The recipe's condition and vector artifacts, saved in ``directory``."""
    condition = _direction(handle)
    save_vector(directory / "condition", condition, handle=handle)
    vector = random_vector(3, handle.num_layers, handle.d_model) * 4.0
    save_vector(directory / "vector", vector, handle=handle)
    return condition, vector


def test_a_recipe_gate_over_several_hooks_round_trips_and_runs_as_built_by_hand(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    handle = tiny_llama
    condition, vector = _artifacts(handle, tmp_path)
    path = tmp_path / "summed.toml"
    path.write_text(_recipe(f'["{FIRST}", "{SECOND}"]', "[1.5, -0.5]"))
    recipe = load_edit_recipe(path)
    gate = recipe.edits[0].gate
    assert gate == EditGate(
        (FIRST, SECOND), "condition", 0.25, False, GateScope.PROMPT, (1.5, -0.5)
    )
    text = recipe_to_toml(recipe)
    assert recipe_to_toml(load_edit_recipe(text)) == text
    [from_recipe] = recipe.lowered(handle.num_layers)
    by_hand = Gated(
        Condition((FIRST, SECOND), condition, 0.25, weights=(1.5, -0.5)),
        Add(vector, 1.0, (SECOND,)),
        GateScope.PROMPT,
    )
    assert _events(handle, (from_recipe,), batch=2) == _events(handle, (by_hand,), batch=2)


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ({"hook": FIRST, "hooks": [FIRST, SECOND]}, "edits[0].gate.hook"),
        ({"hook": FIRST, "weights": [1.0]}, "edits[0].gate.weights"),
        ({"hooks": [FIRST, SECOND], "weights": [1.0]}, "edits[0].gate.weights"),
        ({"hooks": [FIRST, SECOND], "weights": [1.0, "x"]}, "edits[0].gate.weights[1]"),
        ({"hooks": []}, "edits[0].gate.hooks"),
        ({"hooks": FIRST}, "edits[0].gate.hooks"),
        ({"hooks": [FIRST, 3]}, "edits[0].gate.hooks[1]"),
    ],
)
def test_malformed_hook_lists_in_recipes_name_the_field(gate: dict[str, Any], field: str) -> None:
    table = {"direction": "condition", "threshold": 1.0} | gate
    data = {"edits": [{"kind": "add", "vector": "v", "layers": [1], "gate": table}]}
    with pytest.raises(InvalidArgumentError) as raised:
        parse_edit_recipe(data)
    assert raised.value.field == field


def test_a_recipe_hook_outside_the_model_names_its_index(
    tiny_llama: ModelHandle, tmp_path: Path
) -> None:
    _artifacts(tiny_llama, tmp_path)
    path = tmp_path / "summed.toml"
    path.write_text(_recipe(f'["{FIRST}", "blocks.99.hook_resid_post"]', "[1.0, 1.0]"))
    with pytest.raises(InvalidArgumentError) as raised:
        load_edit_recipe(path).lowered(tiny_llama.num_layers)
    assert raised.value.field == "edits[0].gate.hooks[1]"


def test_summed_scores_calibrate_the_gate_the_engine_runs(tiny_llama: ModelHandle) -> None:
    """The sum of each hook's projection over its quiet-train spread; the calibrated condition
    fires in the engine exactly on the prompts its scores say."""
    handle = tiny_llama
    words = ("fox", "sea", "moon", "bread", "knight", "dragon")
    prompts = [f"Tell me about the {a} and the {b}." for a in words for b in words if a != b]
    train = ContrastPrompts(fire=prompts[0:20:2], quiet=prompts[1:20:2])
    validation = ContrastPrompts(fire=prompts[20::2], quiet=prompts[21::2])
    direction = _direction(handle)
    scores = gate_scores(handle, [FIRST, SECOND], direction, train=train, validation=validation)
    summed = summed_scores(scores)
    assert summed.hook == (FIRST, SECOND)
    for score, weight in zip(scores, summed.weights, strict=True):
        assert weight == pytest.approx(1 / torch.tensor(score.read["train.quiet"]).double().std())
    for key, values in summed.read.items():
        expected = [sum(w * s.read[key][i] for w, s in zip(summed.weights, scores, strict=True))
                    for i in range(len(values))]  # fmt: skip
        assert values == pytest.approx(expected)
    calibration = summed.calibrate(0.3)
    gated = Gated(
        calibration.condition(direction), _added(handle, (SECOND,), Phase.GENERATED),
        GateScope.PROMPT,
    )  # fmt: skip
    engine_prompts = list(validation.fire)
    fires = summed.fires("validation.fire", calibration.threshold)
    assert 0 < sum(fires) < len(fires)
    moved = 0
    for prompt, fired in zip(engine_prompts, fires, strict=True):
        request = replace(BASE, prompt_ids=tuple(encode_chat(handle, prompt)), max_new_tokens=3)
        plain = Engine(handle).run([request])[0].token_ids
        steered = Engine(handle).run([replace(request, interventions=(gated,))])[0].token_ids
        always = Engine(handle).run([replace(request, interventions=(gated.inner,))])[0].token_ids
        assert steered == (always if fired else plain)
        moved += always != plain
    assert moved == len(engine_prompts)  # the edit shows wherever it acts
    with pytest.raises(InvalidArgumentError):
        summed_scores(scores[:1])
