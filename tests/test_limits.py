"""One finiteness check (steer.limits.finite) behind every number a user's file or call gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from steer.directions.recipe import load_direction_recipe
from steer.errors import InvalidArgumentError
from steer.limits import finite
from steer.recipes import load_edit_recipe
from steer.sae.training import TrainingConfig
from steer.vectors import SteeringVector

HOOK = "blocks.1.hook_resid_post"


def test_finite() -> None:
    assert finite(2, "x") == 2.0 and finite("1.5", "x") == 1.5
    assert finite(1.5, "x", numbers_only=True) == 1.5
    for bad in (float("inf"), float("nan"), True, None, "many", 10**400):
        with pytest.raises(InvalidArgumentError) as error:
            finite(bad, "x")
        assert error.value.field == "x"
    with pytest.raises(InvalidArgumentError):
        finite("1.5", "x", numbers_only=True)
    with pytest.raises(InvalidArgumentError):
        finite(-11.0, "x", magnitude=10.0)


def _add_edit(strength: Any) -> Callable[[], object]:
    return lambda: load_edit_recipe(
        {"edits": [{"kind": "add", "vector": "v", "strength": strength}]}
    )


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (_add_edit(float("inf")), "edits[0].strength"),
        (_add_edit("1.5"), "edits[0].strength"),
        # an integer too large for a float was an OverflowError, not a field error
        (_add_edit(10**400), "edits[0].strength"),
        (lambda: SteeringVector.from_shared([1.0, 2.0]) * float("nan"), "strength"),
        (lambda: 10**400 * SteeringVector.from_shared([1.0, 2.0]), "strength"),
        (lambda: TrainingConfig(hook=HOOK, learning_rate=float("inf")), "learning_rate"),
        (lambda: TrainingConfig(hook=HOOK, learning_rate=10**400), "learning_rate"),
        (lambda: TrainingConfig(hook=HOOK, sparsity_coefficient=True), "sparsity_coefficient"),
        (lambda: TrainingConfig(hook=HOOK, sparsity_coefficient=-1.0), "sparsity_coefficient"),
    ],
)
def test_numbers_are_refused_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        make()
    assert error.value.field == field


def test_sweep_strengths_must_be_finite() -> None:
    recipe = load_direction_recipe("recipes/steering.toml").to_dict()
    recipe["sweep"] = {**recipe.get("sweep", {}), "strengths": [0.1, float("inf")]}
    with pytest.raises(InvalidArgumentError) as error:
        load_direction_recipe(recipe)
    assert error.value.field == "sweep.strengths"


def test_finite_scale_still_scales() -> None:
    vector = SteeringVector.from_shared([1.0, -2.0])
    assert vector.shared is not None
    scaled = 3 * vector
    assert scaled.shared is not None and torch.equal(scaled.shared, torch.tensor([3.0, -6.0]))


def test_messages_do_not_echo_huge_values() -> None:
    with pytest.raises(InvalidArgumentError) as error:
        finite("x" * 1_000_000, "strength")
    assert len(error.value.message) < 100
    with pytest.raises(InvalidArgumentError) as error:
        finite(10**4000, "strength")
    assert error.value.message == "is too large for a number"


def test_http_numbers_use_the_same_check() -> None:
    from steer.http.values import _number

    assert _number("temperature", 2) == 2.0
    for bad in (float("inf"), 10**400):
        with pytest.raises(InvalidArgumentError) as error:
            _number("temperature", bad)
        assert error.value.field == "temperature"
