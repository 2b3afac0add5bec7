"""``steer directions gate --condition A,B --choose new-source --calibrate new-source``:
candidates of several conditions, the one kept by how it does on each source of prompts when
fitted without it (a moralizing recipe's check sets: its data.gate_fire and data.gate_quiet
files, pairwise), and thresholds set by those sources too."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gate_setup import gate_setup, run_gate

from steer.artifacts import load_vector
from steer.calibration import read_prompts
from steer.directions.gate_styles import source_labels
from steer.directions.gating import (
    gate_origins,
    gate_prompts,
    gate_splits,
    prompt_forms,
    quiet_sets,
)
from steer.directions.recipe import load_direction_recipe
from steer.directions.scene_forms import SCENE_FORMS, scene_prompts
from steer.models import ModelHandle
from steer.recipes import load_edit_recipe

HOOKS = "blocks.1.hook_resid_pre,blocks.2.hook_resid_pre"
WHO = {
    "pirates": ("Captain Vex, a ruthless pirate", "Mara, a cutthroat bosun"),
    "courtiers": ("Lord Malrec, a scheming vizier", "Lady Sable, a poisoner"),
    "bakers": ("Bram, a village baker", "Tomas, a miller"),
    "sailors": ("Ilse, a ferry captain", "Otto, a lighthouse keeper"),
}
DEEDS = ("burn the village", "sink the ship", "poison the well", "rob the temple")
ASKS = ("the bread", "the weather", "the harbour", "the festival")


def _situations(who: tuple[str, ...], what: tuple[str, ...], verb: str) -> list[str]:
    return [f"You are {w}. A stranger {verb} {x}. Reply in character." for w in who for x in what]


@pytest.fixture
def setup(tiny_llama: ModelHandle, tmp_path: Path) -> dict[str, Path]:
    """A recipe whose gate sets come from two sources: pirates with bakers, courtiers with
    sailors, each pair in files of its own; every situation also played as a scene."""
    files = {}
    for name, verb in (("pirates", "asks you to"), ("courtiers", "begs you to")):
        files[name] = _situations(WHO[name], DEEDS, verb)
    for name in ("bakers", "sailors"):
        files[name] = _situations(WHO[name], ASKS, "asks about")
    files["harmful"] = _situations(
        ("Grukk, an orc warlord", "Vel, a necromancer"), DEEDS, "wants to"
    )
    files["harmless"] = [f"Write a poem about {a}." for a in ASKS] * 2
    paths = {}
    for name, lines in files.items():
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n".join(dict.fromkeys(lines)) + "\n")
    return gate_setup(
        tiny_llama,
        tmp_path,
        f'positive = "{paths["harmful"]}"\nnegative = "{paths["harmless"]}"\nfilter = false\n'
        f'gate_fire = ["{paths["pirates"]}", "{paths["courtiers"]}"]\n'
        f'gate_quiet = ["{paths["bakers"]}", "{paths["sailors"]}"]\n'
        "gate_scenes = true\ntrain = 0.5\nvalidation = 0.3\n",
    )


def test_gate_sets_taken_pairwise_are_sources_and_scenes_keep_theirs(
    tiny_llama: ModelHandle, setup: dict[str, Path]
) -> None:
    """The i-th gate_fire and gate_quiet files are one source; a situation played as a scene
    has its situation's source, so holding a source out holds its scenes out too; the recipe's
    own sets are never held out."""
    recipe = load_direction_recipe(setup["recipe"])
    splits = gate_splits(recipe)
    renders = scene_prompts(tiny_llama)
    parts = {part: gate_prompts(splits, part, renders) for part in ("train", "validation")}
    origins = {part: gate_origins(splits, part, len(renders)) for part in parts}
    labels = source_labels(recipe, parts, origins)
    assert labels is not None
    names = {"pirates.txt + bakers.txt", "courtiers.txt + sailors.txt"}
    for part in ("train", "validation"):
        fire = labels[f"{part}.fire"]
        own = len(getattr(splits["positive"], part))
        one_message = own + len(getattr(splits["fire"], part))
        assert fire[:own] == [""] * own  # the recipe's own villains: never held out
        assert set(fire[own:one_message]) == names
        # each scene form repeats the situations' sources in order
        for form in range(len(renders)):
            start = one_message * (form + 1)
            assert fire[start : start + one_message] == fire[:one_message]
    assert source_labels(recipe, parts) != labels  # without the origins, scenes have none


def test_each_gate_prompt_is_labelled_with_its_form(
    tiny_llama: ModelHandle, setup: dict[str, Path]
) -> None:
    """``gate_reads`` labels each prompt with the form it is in: "message" for the prompts as
    written, then each scene form for exactly the situations rendered in it."""
    recipe = load_direction_recipe(setup["recipe"])
    splits = gate_splits(recipe)
    renders = dict(zip(SCENE_FORMS, scene_prompts(tiny_llama), strict=True))
    for part in ("train", "validation"):
        prompts = gate_prompts(splits, part, tuple(renders.values()))
        plain = gate_prompts(splits, part)
        for side in ("fire", "quiet"):
            listed = getattr(prompts, side)
            labels = prompt_forms(splits, part, side, SCENE_FORMS, len(listed) + 2)
            assert labels[-2:] == ("played", "played")
            assert labels.count("message") == len(getattr(plain, side))
            situations = [p for p, f in zip(listed, labels, strict=False) if f == "message"]
            for form, render in renders.items():
                rendered = [p for p, f in zip(listed, labels, strict=False) if f == form]
                assert rendered and all(not isinstance(p, str) for p in rendered)
                # the situations rendered: the fire side's every one, the quiet side's own set's
                texts = situations if side == "fire" else situations[-len(rendered) :]
                assert rendered == [render(text) for text in texts]


def _report(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _separation(rates: dict[str, Any]) -> tuple[float, float]:
    return (
        rates["true_positive_rate"] - rates["false_positive_rate"],
        -rates["false_positive_rate"],
    )


def test_choose_new_source_keeps_the_candidate_that_separates_new_sources_best(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every condition at every hook (and summed) is a candidate with its new-source rates;
    ``--choose new-source`` keeps the best of those, ``--choose validation`` the best on
    validation, of the very same candidates; the written recipe holds the kept gate."""
    flags = ("--hooks", HOOKS, "--condition", "direction,contrast", "--summed")
    flags += ("--target-fpr", "0.2")
    assert run_gate(setup, *flags, "--choose", "new-source") == 0
    report = _report(capsys)
    candidates = report["candidates"]
    assert [(c["condition"], c["hook"]) for c in candidates] == [
        (condition, hook)
        for condition in ("direction", "contrast")
        for hook in [*HOOKS.split(","), HOOKS.split(",")]
    ]
    assert all(c["new_source"] is not None for c in candidates)
    best = max(candidates, key=lambda c: _separation(c["new_source"]))
    assert report["choose"] == "new-source" and report["condition"] == best["condition"]
    assert report["kept"]["hook"] == best["hook"] and report["new_source"] == best["new_source"]
    gate = load_edit_recipe(report["recipe"]).edits[0].gate
    assert gate is not None and gate.threshold == best["threshold"]
    hook = best["hook"]
    assert gate.hook == (hook if isinstance(hook, str) else tuple(hook))
    assert run_gate(setup, *flags, "--choose", "validation") == 0
    again = _report(capsys)
    assert again["candidates"] == candidates  # the same candidates, another choice
    kept = max(candidates, key=lambda c: _separation(c["validation"]))
    assert (again["condition"], again["kept"]["hook"]) == (kept["condition"], kept["hook"])
    assert (kept["condition"], kept["hook"]) != (
        best["condition"],
        best["hook"],
    )  # here they differ


def test_calibrating_on_new_sources_raises_each_threshold_until_they_keep_the_target(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--calibrate new-source``: the same candidates, each threshold the train one or higher,
    at a level where the gates fitted without each source fire on at most the target of its
    quiet prompts, pooled (here some are raised); the recipe holds the kept one and says so."""
    flags = ("--hooks", HOOKS, "--condition", "direction,contrast", "--summed")
    flags += ("--target-fpr", "0.2", "--choose", "new-source")
    assert run_gate(setup, *flags) == 0
    trained = _report(capsys)
    assert run_gate(setup, *flags, "--calibrate", "new-source") == 0
    raised = _report(capsys)
    assert (trained["calibrate"], raised["calibrate"]) == ("train", "new-source")
    lifted = 0
    for before, after in zip(trained["candidates"], raised["candidates"], strict=True):
        assert (before["condition"], before["hook"]) == (after["condition"], after["hook"])
        assert before["new_source"]["level"] is None and after["new_source"]["level"] is not None
        assert after["new_source"]["false_positive_rate"] <= 0.2
        sign = -1.0 if after["below"] else 1.0
        assert sign * after["threshold"] >= sign * before["threshold"]
        assert after["train"]["false_positive_rate"] <= before["train"]["false_positive_rate"]
        lifted += sign * after["threshold"] > sign * before["threshold"]
    assert lifted > 0
    best = max(raised["candidates"], key=lambda c: _separation(c["new_source"]))
    assert (raised["condition"], raised["kept"]["hook"]) == (best["condition"], best["hook"])
    recipe = load_edit_recipe(raised["recipe"])
    gate = recipe.edits[0].gate
    assert gate is not None and gate.threshold == best["threshold"]
    assert "raised" in recipe.description


def test_calibrating_on_each_quiet_set_holds_the_target_on_the_situations_too(
    tiny_llama: ModelHandle, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--calibrate each-set``: every candidate's threshold is the one that keeps the target on
    the ordinary requests and on the situations without a trigger apart (as scenes too), by
    hand from the same reads, and never under the pooled one; the held-out estimates are of
    gates calibrated so too, and the recipe says so."""
    flags = ("--hooks", HOOKS, "--condition", "direction", "--target-fpr", "0.2")
    assert run_gate(setup, *flags) == 0
    pooled = _report(capsys)
    assert run_gate(setup, *flags, "--calibrate", "each-set") == 0
    apart = _report(capsys)
    assert apart["calibrate"] == "each-set"
    recipe = load_direction_recipe(setup["recipe"])
    splits = gate_splits(recipe)
    renders = scene_prompts(tiny_llama)
    parts = {part: gate_prompts(splits, part, renders) for part in ("train", "validation")}
    reads = read_prompts(
        tiny_llama, HOOKS.split(","), train=parts["train"], validation=parts["validation"]
    )
    sets = {f"{p}.quiet": quiet_sets(splits, p, len(parts[p].quiet)) for p in parts}
    assert set(sets["train.quiet"]) == {"requests", "situations"}
    scores = replace(reads, quiet_sets=sets).scores(load_vector(setup["direction"]).vector)
    raised = 0
    for before, after, score in zip(pooled["candidates"], apart["candidates"], scores, strict=True):
        assert after["hook"] == score.hook
        assert after["threshold"] == score.calibrate(0.2, each_set=True).threshold
        assert after["threshold"] >= before["threshold"]
        raised += after["threshold"] > before["threshold"]
        for name in ("requests", "situations"):
            own = [
                q
                for q, n in zip(score.read["train.quiet"], sets["train.quiet"], strict=True)
                if n == name
            ]
            assert sum(q > after["threshold"] for q in own) <= 0.2 * len(own)
        assert after["new_source"] is not None
    assert raised > 0
    assert apart["candidates"] != pooled["candidates"]
    assert "each quiet set apart" in load_edit_recipe(apart["recipe"]).description


def test_several_calibrations_from_one_read_equal_one_run_each(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--calibrate train,each-set,new-source`` reads the prompts once and writes one recipe per
    calibration into OUT/<calibration>/, each the one a run of that calibration alone writes."""
    flags = ("--hooks", HOOKS, "--condition", "direction", "--target-fpr", "0.2", "--summed")
    calibrations = ("train", "each-set", "new-source")
    assert run_gate(setup, *flags, "--calibrate", ",".join(calibrations)) == 0
    together = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [report["calibrate"] for report in together] == list(calibrations)
    written = {name: (setup["out"] / name / "gated.toml").read_text() for name in calibrations}
    for name, report in zip(calibrations, together, strict=True):
        assert Path(report.pop("recipe")) == setup["out"] / name / "gated.toml"
        alone_out = setup["out"].parent / f"alone-{name}"
        assert run_gate({**setup, "out": alone_out}, *flags, "--calibrate", name) == 0
        alone = _report(capsys)
        assert Path(alone.pop("recipe")) == alone_out / "gated.toml"
        assert report == alone
        recipe = (alone_out / "gated.toml").read_text()
        assert written[name] == recipe.replace(str(alone_out), str(setup["out"] / name))
    assert len({report["kept"]["threshold"] for report in together}) > 1


def test_choosing_by_new_sources_without_sources_is_a_clear_error(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One gate_quiet file for two gate_fire files: no sources to hold out, so neither choosing
    nor calibrating by them; refused before the model loads, nothing written; so are an unknown
    choice, calibration and second condition."""
    text = setup["recipe"].read_text()
    setup["recipe"].write_text(
        re.sub(r'gate_quiet = \["([^"]+)", "[^"]+"\]', r'gate_quiet = ["\1"]', text)
    )
    assert setup["recipe"].read_text() != text
    for flags, field in (
        (("--choose", "new-source"), "choose"),
        (("--choose", "oracle"), "choose"),
        (("--calibrate", "new-source"), "calibrate"),
        (("--calibrate", "oracle"), "calibrate"),
        (("--calibrate", "train,train"), "calibrate"),
        (("--condition", "direction,vibes"), "condition[1]"),
    ):
        assert run_gate(setup, "--hooks", HOOKS, *flags) == 1
        err = capsys.readouterr().err
        assert field in err and "loading" not in err
    assert not setup["out"].exists()
