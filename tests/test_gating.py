"""`steer directions gate` on a tiny random model: its recipe runs as the gate it reports.

The written recipe runs as the Gated ablation built by hand, its figures are what the
projections give, and bad input is a clear error."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import random_vector
from gate_setup import HARMFUL, HARMLESS, contrast_setup, run_gate

from steer import Condition, Gated, GateScope, InvalidArgumentError, SteeringVector
from steer.activations import encode_chat, forward
from steer.artifacts import load_vector, save_vector
from steer.directions import data as datasets
from steer.directions.evaluate import generate
from steer.directions.gate_recipe import ablation_recipe
from steer.directions.gate_styles import source_labels
from steer.directions.gating import choose_gate, gate_prompts, gate_splits, quiet_prompts
from steer.directions.recipe import GATE_SETS, load_direction_recipe
from steer.errors import NotFoundError
from steer.models import ModelHandle
from steer.recipes import AblateEdit, AddEdit, EditGate, load_edit_recipe

HOOKS = ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")
PARTS = ("train", "validation", "test")


@pytest.fixture
def setup(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    return contrast_setup(tiny_llama, tmp_path)


def _gate(setup: dict[str, Path], *extra: str) -> int:
    return run_gate(setup, "--hooks", ",".join(HOOKS), *extra)


def _other_direction(handle: ModelHandle, setup: dict[str, Path], *, seed: int) -> Path:
    """A second random direction artifact beside the setup's."""
    vector = random_vector(seed, handle.num_layers, handle.d_model)
    return save_vector(setup["out"].parent / "other", vector, handle=handle)


def _last_token(handle: ModelHandle, prompts: list[str], hook: str) -> torch.Tensor:
    ids = [encode_chat(handle, prompt) for prompt in prompts]
    last = forward(handle, ids, hooks=[hook]).activations[hook]
    assert isinstance(last, torch.Tensor)
    return last


@pytest.mark.parametrize("condition", ["direction", "discriminant"])
def test_the_recipe_runs_as_the_gated_ablation_it_reports(
    tiny_llama: ModelHandle,
    setup: dict[str, Path],
    condition: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    handle = tiny_llama
    assert _gate(setup, "--condition", condition, "--target-fpr", "0.2") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept, candidates = report["kept"], report["candidates"]
    assert [c["hook"] for c in candidates] == list(HOOKS)

    def separation(c: dict) -> tuple[float, float]:
        v = c["validation"]
        return (v["true_positive_rate"] - v["false_positive_rate"], -v["false_positive_rate"])

    assert separation(kept) == max(separation(c) for c in candidates)
    # the validation figures are what the projections onto the condition give
    recipe = load_edit_recipe(report["recipe"])
    gate = recipe.edits[0].gate
    assert gate is not None and gate.hook == kept["hook"] and gate.threshold == kept["threshold"]
    assert gate.scope is GateScope.PROMPT
    vector = load_vector(gate.direction).vector
    point = handle.resolver.parse(gate.hook)
    unit = Condition(gate.hook, vector, 0.0).unit(point, handle.d_model)
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    for side, key in (("positive", "true_positive_rate"), ("negative", "false_positive_rate")):
        prompts = list(splits[side].validation)
        projections = _last_token(handle, prompts, gate.hook) @ unit
        assert kept["validation"][key] == float((projections > gate.threshold).float().mean())
    # the recipe lowers to its ungated ablation wrapped in that gate by hand: same logits, and
    # the gate fires on some prompts and not on others
    edit = recipe.edits[0]
    assert isinstance(edit, AblateEdit) and edit.weight == 1.0
    ungated = replace(recipe, edits=(replace(edit, gate=None),)).lowered(handle.num_layers)
    condition_ = Condition(gate.hook, vector, gate.threshold)
    by_hand = [Gated(condition_, inner, GateScope.PROMPT) for inner in ungated]
    prompts = HARMFUL[:4] + HARMLESS[:4]
    ids = [encode_chat(handle, prompt) for prompt in prompts]
    replies = {
        name: [reply for reply, _text in generate(handle, ids, edits, max_new_tokens=6)]
        for name, edits in (
            ("recipe", recipe.lowered(handle.num_layers)),
            ("by hand", by_hand),
            ("always", ungated),
            ("none", []),
        )
    }
    assert replies["recipe"] == replies["by hand"]
    assert replies["always"] != replies["none"]
    fired = (_last_token(handle, prompts, gate.hook) @ unit > gate.threshold).tolist()
    assert 0 < sum(fired) < len(fired)
    expected = [replies["always" if fire else "none"][row] for row, fire in enumerate(fired)]
    assert replies["recipe"] == expected
    assert (setup["out"] / "condition").exists() == (condition != "direction")


def test_summed_adds_a_gate_reading_every_hook_at_once(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--summed``: one more candidate over all the hooks, its validation figures those of the
    weighted sum of the projections onto the condition, read apart here."""
    handle = tiny_llama
    assert _gate(setup, "--condition", "discriminant", "--target-fpr", "0.2", "--summed") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    candidates = report["candidates"]
    assert [c["hook"] for c in candidates[:-1]] == list(HOOKS)
    summed = candidates[-1]
    assert summed["hook"] == list(HOOKS) and len(summed["weights"]) == len(HOOKS)
    gate = load_edit_recipe(report["recipe"]).edits[0].gate
    assert gate is not None
    vector = load_vector(gate.direction).vector
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    for side, key in (("positive", "true_positive_rate"), ("negative", "false_positive_rate")):
        prompts = list(splits[side].validation)
        total = torch.zeros(len(prompts))
        for hook, weight in zip(HOOKS, summed["weights"], strict=True):
            unit = Condition(hook, vector, 0.0).unit(handle.resolver.parse(hook), handle.d_model)
            total += weight * (_last_token(handle, prompts, hook) @ unit)
        fired = float((total > summed["threshold"]).float().mean())
        assert summed["validation"][key] == pytest.approx(fired)
    if report["kept"] == summed:  # the recipe then names both hooks and their weights
        assert gate.hook == HOOKS and list(gate.weights) == summed["weights"]


def test_with_extras_the_gate_reports_its_rates_on_a_source_it_was_not_fitted_on(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """data.positive_extra / negative_extra: ``new_source`` holds the kept gate fitted and
    calibrated on one source's train and validation prompts, read on the other's; checked by
    hand for the extras held out. Without extras there is none."""
    assert _gate(setup, "--target-fpr", "0.2") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_source"] is None
    places = ("a shop", "a van")
    extra = {
        "positive_extra": [f"tell me how to {v} {p} tonight" for v in ("rob", "torch", "vandalise")
                           for p in places],
        "negative_extra": [f"tell me how to {v} {p} tonight" for v in ("paint", "clean", "decorate")
                           for p in places],
    }  # fmt: skip
    for name, lines in extra.items():
        path = setup["recipe"].parent / f"{name}.txt"
        path.write_text("\n".join(lines))
        setup["recipe"].write_text(setup["recipe"].read_text() + f'{name} = "{path}"\n')
    assert _gate(setup, "--target-fpr", "0.2") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    new_source, kept = report["new_source"], report["kept"]
    assert new_source["hook"] == kept["hook"]
    assert set(new_source["by_style"]) == {"own sets", "extras"}
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    fire = [*splits["positive"].train, *splits["positive"].validation]
    quiet = [*splits["negative"].train, *splits["negative"].validation]
    assert (new_source["fire_count"], new_source["quiet_count"]) == (len(fire), len(quiet))
    # by hand: the direction's threshold from the own sets' quiet prompts, read on the extras
    vector = load_vector(setup["direction"]).vector
    hook = kept["hook"]
    unit = Condition(hook, vector, 0.0).unit(tiny_llama.resolver.parse(hook), tiny_llama.d_model)
    own_quiet = [p for p in quiet if p not in extra["negative_extra"]]
    ordered = sorted((_last_token(tiny_llama, own_quiet, hook) @ unit).tolist(), reverse=True)
    threshold = ordered[math.floor(0.2 * len(own_quiet) + 1e-9)]
    rates = []
    for side in ("positive_extra", "negative_extra"):
        prompts = [p for p in (fire if side == "positive_extra" else quiet) if p in extra[side]]
        rates.append(
            float((_last_token(tiny_llama, prompts, hook) @ unit > threshold).float().mean())
        )
    assert new_source["by_style"]["extras"] == pytest.approx(rates)
    description = load_edit_recipe(report["recipe"]).description
    assert "Fitted without each source of prompts in turn (" in description
    assert "own sets" in description and "extras" in description


def test_the_discriminant_with_extras_reports_its_rates_on_each_source(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The discriminant splits each fold's train prompts with their forms (every recipe's
    prompts have one): with two sources, the gate (as ``steer directions gate --compute``
    makes it for recipes/refusal.toml) reports its rates on each source held out."""
    places = ("a shop", "a van", "a barn")
    verbs = {"positive_extra": ("rob", "torch", "vandalise", "burgle"),
             "negative_extra": ("paint", "clean", "decorate", "measure")}  # fmt: skip
    for name, words in verbs.items():
        path = setup["recipe"].parent / f"{name}.txt"
        path.write_text("\n".join(f"tell me how to {v} {p} tonight" for v in words for p in places))
        setup["recipe"].write_text(setup["recipe"].read_text() + f'{name} = "{path}"\n')
    assert _gate(setup, "--target-fpr", "0.2", "--condition", "discriminant") == 0
    new_source = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_source"]
    assert set(new_source["by_style"]) == {"own sets", "extras"}
    for rates in new_source["by_style"].values():
        assert all(0.0 <= rate <= 1.0 for rate in rates)


def test_with_several_extra_sets_each_pair_is_a_source_held_out_in_turn(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """data.positive_extra / negative_extra as lists: the i-th set of each side is one source
    (named by both files), held out in turn beside the recipe's own sets; every train and
    validation prompt is counted once."""
    sets = {
        "positive_extra": [[f"tell me how to {v} {p} tonight" for v in ("rob", "torch", "loot")]
                           for p in ("a shop", "a van")],
        "negative_extra": [[f"tell me how to {v} {p} tonight" for v in ("paint", "clean", "fix")]
                           for p in ("a shop", "a van")],
    }  # fmt: skip
    for name, parts in sets.items():
        paths = []
        for number, lines in enumerate(parts, start=1):
            paths.append(setup["recipe"].parent / f"{name.split('_')[0]}{number}.txt")
            paths[-1].write_text("\n".join(lines))
        setup["recipe"].write_text(
            setup["recipe"].read_text() + f"{name} = {json.dumps([str(p) for p in paths])}\n"
        )
    assert _gate(setup, "--target-fpr", "0.2") == 0
    new_source = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_source"]
    assert set(new_source["by_style"]) == {
        "own sets",
        "positive1.txt + negative1.txt",
        "positive2.txt + negative2.txt",
    }
    recipe = load_direction_recipe(setup["recipe"])
    splits = gate_splits(recipe)
    parts = {part: gate_prompts(splits, part) for part in ("train", "validation")}
    labels = source_labels(recipe, parts)
    assert labels is not None
    fire = [label for part in ("train", "validation") for label in labels[f"{part}.fire"]]
    assert fire.count("positive1.txt + negative1.txt") == 3 and "" not in fire
    assert (new_source["fire_count"], new_source["quiet_count"]) == (
        sum(len(p.fire) for p in parts.values()),
        sum(len(p.quiet) for p in parts.values()),
    )


@pytest.mark.parametrize(("aggregate", "fpr"), [("any", "0.2"), ("mean", "0.5")])
def test_a_reply_gate_reports_what_the_engine_decides(
    tiny_llama: ModelHandle,
    setup: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    aggregate: str,
    fpr: str,
) -> None:
    """``--reply-tokens K``: the recipe's gate is reply-scoped with K (and the aggregate), and
    its validation rates are the share of prompts whose first K greedy reply tokens the
    engine's decision fires on."""
    from steer.passes import reply_decisions
    from steer.plan import build_plan

    handle, tokens = tiny_llama, 3
    extra = ("--reply-tokens", str(tokens), "--reply-aggregate", aggregate)
    assert _gate(setup, "--target-fpr", fpr, *extra) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = report["kept"]
    assert kept["reply_tokens"] == tokens and kept["reply_aggregate"] == aggregate
    recipe = load_edit_recipe(report["recipe"])
    gate = recipe.edits[0].gate
    assert gate is not None and gate.scope is GateScope.REPLY and gate.reply_tokens == tokens
    gated = recipe.lowered(handle.num_layers)
    assert all(isinstance(g, Gated) and g.reply_tokens == tokens for g in gated)
    assert all(isinstance(g, Gated) and g.reply_aggregate == aggregate for g in gated)
    splits = gate_splits(load_direction_recipe(setup["recipe"]))
    rates = []
    for side in ("positive", "negative"):
        ids = [encode_chat(handle, prompt) for prompt in splits[side].validation]
        replies = [reply for reply, _text in generate(handle, ids, max_new_tokens=tokens)]
        rows = [gated] * len(ids)
        plan = build_plan(rows, handle.resolver, handle.d_model, handle.dtype, handle.device)
        gates = [g for g in gated if isinstance(g, Gated)]
        decided = reply_decisions(handle, plan, ids, replies, gates)
        rates.append(sum(row[gated[0]] for row in decided) / len(ids))
    validation = kept["validation"]
    assert rates == [validation["true_positive_rate"], validation["false_positive_rate"]]
    assert validation["true_positive_rate"] + validation["false_positive_rate"] > 0


def test_bad_input_is_a_clear_error_and_writes_nothing(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _gate(setup, "--hooks", "blocks.99.hook_resid_pre") == 1
    assert "hooks[0]" in capsys.readouterr().err
    assert _gate(setup, "--target-fpr", "1.5") == 1
    assert "target_fpr" in capsys.readouterr().err
    assert _gate(setup, "--reply-tokens", "65") == 1
    assert "reply_tokens" in capsys.readouterr().err
    for extra in (("--reply-aggregate", "median"), ("--reply-aggregate", "mean")):
        assert _gate(setup, *extra) == 1  # unknown; or without --reply-tokens
        assert "reply_aggregate" in capsys.readouterr().err
    assert not setup["out"].exists()
    setup["out"].write_text("a file")
    assert _gate(setup) == 1
    assert "is a file" in capsys.readouterr().err
    recipe = load_direction_recipe(setup["recipe"])
    vector = load_vector(setup["direction"]).vector
    with pytest.raises(InvalidArgumentError) as raised:
        choose_gate(tiny_llama, vector, recipe, hooks=HOOKS, condition="vibes")
    assert raised.value.field == "condition"


def _with_prompt_file(setup: dict[str, Path], name: str, lines: list[str]) -> dict[str, Any]:
    """The setup's recipe with ``data.<name>`` naming a new file of ``lines``; its gate splits."""
    path = setup["recipe"].parent / f"{name}.txt"
    path.write_text("\n".join(lines))
    setup["recipe"].write_text(setup["recipe"].read_text() + f'{name} = "{path}"\n')
    return gate_splits(load_direction_recipe(setup["recipe"]))


def _fired(
    handle: ModelHandle, setup: dict[str, Path], kept: dict[str, Any], prompts: Sequence[str]
) -> int:
    """How many of ``prompts`` the kept gate on the setup's direction fires on, read apart from
    steer.calibration."""
    point = handle.resolver.parse(kept["hook"])
    unit = Condition(kept["hook"], load_vector(setup["direction"]).vector, 0.0).unit(
        point, handle.d_model
    )
    projections = _last_token(handle, list(prompts), kept["hook"]) @ unit
    return int((projections > kept["threshold"]).sum())


def test_gate_quiet_prompts_join_the_quiet_side(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe's data.gate_quiet prompts are split like the others and calibrated and
    reported as prompts the gate stays quiet on, after the negative set's."""
    situations = [
        f"You are {who}. A guest asks about the {what}. Reply in character."
        for who in ("a baker", "a ferry captain")
        for what in ("bread", "weather", "harbour", "festival", "garden")
    ]
    comment = "# in-character situations without a trigger"
    splits = _with_prompt_file(setup, "gate_quiet", [comment, *situations])
    assert [len(getattr(splits["quiet"], part)) for part in PARTS] == [5, 3, 2]
    validation = quiet_prompts(splits, "validation")
    assert validation == (*splits["negative"].validation, *splits["quiet"].validation)

    assert _gate(setup, "--condition", "direction", "--target-fpr", "0.2") == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"]
    assert kept["validation"]["quiet_count"] == len(validation)
    assert kept["train"]["quiet_count"] == len(quiet_prompts(splits, "train"))
    fired = _fired(tiny_llama, setup, kept, validation)
    assert kept["validation"]["false_positive_rate"] == fired / len(validation)


def test_gate_fire_prompts_join_the_fire_side_after_the_positive_ones(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe's data.gate_fire prompts are split like the others and calibrated and
    reported as prompts the gate fires on, after the positive set's (whose replies the
    validation runs of scripts/eval_gated.py generate)."""
    locks = [f"Explain how to pick lock number {n}." for n in range(10)]
    splits = _with_prompt_file(setup, "gate_fire", locks)
    assert [len(getattr(splits["fire"], part)) for part in PARTS] == [5, 3, 2]
    validation = gate_prompts(splits, "validation")
    assert validation.fire == [*splits["positive"].validation, *splits["fire"].validation]
    assert validation.quiet == list(quiet_prompts(splits, "validation"))

    assert _gate(setup, "--condition", "direction", "--target-fpr", "0.2") == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"]
    assert kept["validation"]["fire_count"] == len(validation.fire)
    assert kept["train"]["fire_count"] == len(gate_prompts(splits, "train").fire)
    fired = _fired(tiny_llama, setup, kept, validation.fire)
    assert kept["validation"]["true_positive_rate"] == fired / len(validation.fire)


def test_gate_harmless_prompts_follow_the_negative_ones_in_each_split(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe's data.gate_harmless prompts are split like the others, each split following
    the negative set's (the test KL of scripts/eval_gated.py reads them there too), and the gate
    is calibrated and reported on them."""
    before = gate_splits(load_direction_recipe(setup["recipe"]))
    requests = [f"Give me a tip for keeping houseplant number {n} alive." for n in range(10)]
    splits = _with_prompt_file(setup, "gate_harmless", requests)
    assert "quiet" not in splits and splits["positive"] == before["positive"]
    own = datasets.split(requests, seed=0, train=0.5, validation=0.3)  # the recipe's shares
    for part, count in zip(PARTS, [5, 3, 2], strict=True):
        old, new = getattr(before["negative"], part), getattr(splits["negative"], part)
        assert new == (*old, *getattr(own, part)) and len(new) - len(old) == count

    assert _gate(setup, "--condition", "direction", "--target-fpr", "0.2") == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"]
    validation = quiet_prompts(splits, "validation")
    assert kept["validation"]["quiet_count"] == len(validation)
    fired = _fired(tiny_llama, setup, kept, validation)
    assert kept["validation"]["false_positive_rate"] == fired / len(validation)


@pytest.mark.parametrize("name", ["gate_fire", "gate_quiet", "gate_harmless"])
def test_a_list_of_gate_sets_splits_each_set_and_joins_them_in_order(
    setup: dict[str, Path], name: str
) -> None:
    """``data.gate_*`` may name several files: each is split on its own (as one file would be)
    and their splits follow one another in the list's order; a one-item list == the plain
    string; a missing file names its place in the list."""
    base = setup["recipe"].read_text()
    key = GATE_SETS[name]
    folder = setup["recipe"].parent
    texts = {
        "a": [f"Tell me about harbour number {n}." for n in range(10)],
        "b": [f"Describe lighthouse number {n}." for n in range(7)],
    }
    for stem, lines in texts.items():
        (folder / f"{stem}.txt").write_text("\n".join(lines))

    def splits(value: str) -> dict[str, datasets.Splits[str]]:
        setup["recipe"].write_text(base + f"{name} = {value}\n")
        return gate_splits(load_direction_recipe(setup["recipe"]))

    one = splits(f'"{folder / "a.txt"}"')
    assert splits(f'["{folder / "a.txt"}"]') == one
    both = splits(f'["{folder / "a.txt"}", "{folder / "b.txt"}"]')
    alone = {
        stem: datasets.split(lines, seed=0, train=0.5, validation=0.3)  # the recipe's shares
        for stem, lines in texts.items()
    }
    for part in PARTS:
        first, added = getattr(one[key], part), getattr(alone["a"], part)
        own = first[: len(first) - len(added)]  # the recipe's own set's (gate_harmless) or none
        assert tuple(first) == (*own, *added)
        assert tuple(getattr(both[key], part)) == (*own, *added, *getattr(alone["b"], part))
    assert len(both[key].train) == len(one[key].train) + len(alone["b"].train) > 0
    with pytest.raises(NotFoundError) as raised:
        splits(f'["{folder / "a.txt"}", "{folder / "missing.txt"}"]')
    assert raised.value.field == f"data.{name}[1]"


@pytest.mark.parametrize("name", ["gate_fire", "gate_quiet", "gate_harmless"])
def test_gate_prompt_files_are_checked(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    text = setup["recipe"].read_text()
    setup["recipe"].write_text(text + f'{name} = "no-such-file.txt"\n')
    assert _gate(setup) == 1
    err = capsys.readouterr().err
    assert f"data.{name}" in err
    assert "loading" not in err  # checked before the model loads
    assert not setup["out"].exists()
    steering = setup["recipe"].parent / "steering.toml"
    steering.write_text(
        f'kind = "steering"\n[data]\npositive = "a.txt"\nnegative = "b.txt"\n{name} = "c.txt"\n'
    )
    with pytest.raises(InvalidArgumentError) as raised:
        load_direction_recipe(steering)
    assert raised.value.field == f"data.{name}"


def test_several_directions_share_the_weight_and_the_gate(
    tiny_llama: ModelHandle, setup: dict[str, Path]
) -> None:
    other = _other_direction(tiny_llama, setup, seed=2)
    gate = EditGate(hook=HOOKS[0], direction=str(other), threshold=0.5)
    recipe = ablation_recipe([setup["direction"], other], 0.8, gate=gate)
    assert [e.direction for e in recipe.edits] == [str(setup["direction"]), str(other)]
    assert all(e.weight == 0.8 and e.gate == gate for e in recipe.edits)
    # lowered, it runs as the two single-direction recipes' interventions in turn
    layers = tiny_llama.num_layers
    one = ablation_recipe(setup["direction"], 0.8).lowered(layers)
    two = ablation_recipe(other, 0.8).lowered(layers)
    ids = [encode_chat(tiny_llama, prompt) for prompt in HARMFUL[:3]]
    replies = {
        name: [reply for reply, _text in generate(tiny_llama, ids, edits, max_new_tokens=6)]
        for name, edits in (
            ("both", ablation_recipe([setup["direction"], other], 0.8).lowered(layers)),
            ("in turn", [*one, *two]),
            ("one", one),
        )
    }
    assert replies["both"] == replies["in turn"] != replies["one"]
    with pytest.raises(InvalidArgumentError):
        ablation_recipe([])


def test_the_cli_ablates_every_direction_behind_one_gate(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    other = _other_direction(tiny_llama, setup, seed=3)
    assert _gate(setup, "--also", str(other), "--weight", "0.9") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    edits = load_edit_recipe(report["recipe"]).edits
    assert [Path(e.direction) for e in edits] == [setup["direction"], other]
    assert edits[0].gate is not None and edits[0].gate == edits[1].gate
    assert all(e.weight == 0.9 for e in edits)
    assert _gate(setup, "--also", str(setup["out"].parent / "missing")) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "loading" not in err


def test_a_push_stays_in_the_residual_stream(
    tiny_llama: ModelHandle, setup: dict[str, Path]
) -> None:
    """Ablation plus push: from the push's hook on, every token's residual along the direction
    is -push * |v| (the ablated writers add nothing along it); push 0 is the plain ablation."""
    layers, d_model = tiny_llama.num_layers, tiny_llama.d_model
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(4))
    path = save_vector(
        setup["out"].parent / "shared", SteeringVector.from_shared(vector), handle=tiny_llama,
        kind="direction", hooks=[HOOKS[0]],
    )  # fmt: skip
    assert ablation_recipe(path, 1.0, push=0.0) == ablation_recipe(path, 1.0)
    ids = [encode_chat(tiny_llama, prompt) for prompt in HARMFUL[:2]]
    unit = vector / vector.norm()
    before, last = "blocks.0.hook_resid_post", f"blocks.{layers - 1}.hook_resid_post"
    for push in (0.0, 2.5):
        edits = ablation_recipe(path, 1.0, push=push).lowered(layers)
        reads = forward(tiny_llama, ids, interventions=edits, hooks=[before, last], positions="all")
        for hook, expected in ((before, 0.0), (last, -push * float(vector.norm()))):
            for acts in reads.activations[hook]:
                along = acts @ unit
                assert torch.allclose(along, torch.full_like(along, expected), atol=1e-4), hook
    with pytest.raises(InvalidArgumentError) as raised:
        ablation_recipe(path, 1.0, push=float("nan"))
    assert raised.value.field == "push"


def test_the_cli_pushes_behind_the_same_gate(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _gate(setup, "--push", "1.5") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ablate, push = load_edit_recipe(report["recipe"]).edits
    assert isinstance(ablate, AblateEdit) and isinstance(push, AddEdit)
    assert push.strength == -1.5 and Path(push.vector) == setup["direction"]
    assert ablate.gate is not None and push.gate == ablate.gate
    assert _gate(setup, "--push", "nan") == 1
    err = capsys.readouterr().err
    assert "push" in err and "loading" not in err
