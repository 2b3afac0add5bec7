"""Gate calibration (steer.calibration) on a tiny random model with synthetic separable prompts."""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import replace

import pytest
import torch

import steer.activations
from steer import (
    Add,
    Condition,
    Gated,
    GateScope,
    InvalidArgumentError,
    Phase,
    SteeringVector,
)
from steer.activations import forward
from steer.calibration import (
    ContrastPrompts,
    PromptReads,
    calibrate_gate,
    contrast_condition,
    gate_scores,
    read_prompts,
)
from steer.directions.evaluate import evaluate_rate, gated_report
from steer.generation import Engine, GenerationRequest
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.text import encode_chat

HOOK = "blocks.1.hook_resid_post"
WORDS = ("fox", "sea", "moon", "bread", "knight", "dragon", "robot", "stars")
PROMPTS = tuple(f"Tell me about the {a} and the {b}." for a, b in itertools.permutations(WORDS, 2))
REQUEST = GenerationRequest(
    sampling=SamplingConfig.greedy_config(), max_new_tokens=3, top_logprobs=5
)


def _direction(handle: ModelHandle) -> SteeringVector:
    generator = torch.Generator().manual_seed(7)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))


def _projections(handle: ModelHandle, prompts: tuple[str, ...]) -> list[float]:
    """Independently of steer.calibration: last chat-prompt token at HOOK onto the unit."""
    ids = [encode_chat(handle, prompt) for prompt in prompts]
    last = forward(handle, ids, hooks=[HOOK]).activations[HOOK]
    assert isinstance(last, torch.Tensor)
    vector = _direction(handle).at(1)
    return (last @ (vector / vector.norm())).tolist()


def _splits(
    handle: ModelHandle, count: int = 32
) -> tuple[ContrastPrompts, ContrastPrompts, dict[str, float]]:
    """Separable by construction: the upper half of the projections should fire, the lower
    half should not; alternate prompts go to train and validation."""
    prompts = PROMPTS[:count]
    projection = dict(zip(prompts, _projections(handle, prompts), strict=True))
    ordered = sorted(prompts, key=projection.__getitem__)
    quiet, fire = ordered[: count // 2], ordered[count // 2 :]
    train = ContrastPrompts(fire=fire[::2], quiet=quiet[::2])
    validation = ContrastPrompts(fire=fire[1::2], quiet=quiet[1::2])
    return train, validation, projection


@pytest.mark.parametrize("target", [0.0, 0.05, 0.25, 0.5])
def test_the_threshold_is_the_lowest_that_keeps_the_train_false_positive_rate(
    tiny_llama: ModelHandle, target: float
) -> None:
    train, validation, projection = _splits(tiny_llama)
    # the quiet train prompts include some fire prompts, so the target decides the threshold
    mixed = ContrastPrompts(fire=train.fire, quiet=tuple(train.quiet) + tuple(train.fire[:4]))
    result = calibrate_gate(
        tiny_llama, HOOK, _direction(tiny_llama), train=mixed, validation=validation,
        target_fpr=target,
    )  # fmt: skip
    quiet = [projection[p] for p in mixed.quiet]
    # read in other batches, a value can differ in its last bits: the threshold sits on one
    on = sum(abs(q - result.threshold) <= 1e-4 for q in quiet)
    above = sum(q > result.threshold + 1e-4 for q in quiet)
    assert on >= 1
    assert result.train.false_positive_rate == above / len(quiet) <= target
    # lowest: any lower threshold fires on the quiet prompt it sits on and exceeds the target
    assert (above + on) / len(quiet) > target
    assert result.train.quiet_count == len(quiet) and result.train.fire_count == len(train.fire)
    expected_tpr = sum(projection[p] > result.threshold for p in validation.fire)
    assert result.validation.true_positive_rate == expected_tpr / len(validation.fire)
    assert result.target_fpr == target and result.hook == HOOK


def test_separable_prompts_are_separated_on_validation(tiny_llama: ModelHandle) -> None:
    train, validation, _ = _splits(tiny_llama)
    result = calibrate_gate(
        tiny_llama, HOOK, _direction(tiny_llama), train=train, validation=validation
    )
    assert result.train.true_positive_rate == 1.0
    assert result.train.false_positive_rate == 0.0
    assert result.validation.false_positive_rate <= 0.125  # one quiet prompt at most
    assert result.validation.true_positive_rate >= 0.875


def test_below_calibrates_the_negated_projection(tiny_llama: ModelHandle) -> None:
    train, validation, projection = _splits(tiny_llama)
    flipped = ContrastPrompts(fire=train.quiet, quiet=train.fire)
    result = calibrate_gate(
        tiny_llama, HOOK, _direction(tiny_llama), train=flipped,
        validation=ContrastPrompts(fire=validation.quiet, quiet=validation.fire), below=True,
    )  # fmt: skip
    assert result.below
    assert result.train.true_positive_rate == 1.0 and result.train.false_positive_rate == 0.0
    assert min(projection[p] for p in train.fire) == pytest.approx(result.threshold, rel=1e-6)


def test_the_calibrated_prompt_gate_fires_exactly_where_the_projection_exceeds_it(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    train, validation, projection = _splits(handle)
    result = calibrate_gate(handle, HOOK, _direction(handle), train=train, validation=validation)
    generator = torch.Generator().manual_seed(3)
    vector = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * 4)
    inner = Add(vector, 1.0, ("blocks.0.hook_resid_post",), Phase.GENERATED)
    gated = Gated(result.condition(_direction(handle)), inner, GateScope.PROMPT)
    # a prompt sitting on the threshold is decided by rounding: leave it out
    prompts = [p for p in projection if abs(projection[p] - result.threshold) > 1e-4]
    fired = [projection[p] > result.threshold for p in prompts]
    assert 0 < sum(fired) < len(prompts)

    def run(interventions: tuple) -> list[list]:  # type: ignore[type-arg]
        engine = Engine(handle, max_batch=8)
        ids = [
            engine.submit(
                replace(
                    REQUEST,
                    prompt_ids=tuple(encode_chat(handle, p)),
                    interventions=interventions,
                )
            )
            for p in prompts
        ]
        logprobs: dict[str, list] = {request_id: [] for request_id in ids}  # type: ignore[type-arg]
        while engine.has_work:
            for event in engine.step():
                logprobs[event.request_id].append(event.top_logprobs)
        return [logprobs[request_id] for request_id in ids]

    plain, ungated, steered = run(()), run((inner,)), run((gated,))
    for index, fires in enumerate(fired):
        assert plain[index] != ungated[index]
        if fires:
            flat = [[(t, v) for step in r[index] for t, v in step] for r in (steered, ungated)]
            assert [t for t, _ in flat[0]] == [t for t, _ in flat[1]]
            assert [v for _, v in flat[0]] == pytest.approx(
                [v for _, v in flat[1]], rel=1e-4, abs=1e-4
            )
        else:
            assert steered[index] == plain[index]


def test_no_test_split_is_touched(tiny_llama: ModelHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function has no test split to take, and reads only the prompts it is given."""
    assert not any("test" in name for name in inspect.signature(calibrate_gate).parameters)
    train, validation, _ = _splits(tiny_llama, count=16)
    read: list[list[int]] = []
    original = steer.activations.forward

    def recording(handle, prompts, **kwargs):  # type: ignore[no-untyped-def]
        read.extend(list(p) for p in prompts)
        return original(handle, prompts, **kwargs)

    monkeypatch.setattr(steer.activations, "forward", recording)
    calibrate_gate(tiny_llama, HOOK, _direction(tiny_llama), train=train, validation=validation)
    given = [*train.fire, *train.quiet, *validation.fire, *validation.quiet]
    assert sorted(read) == sorted(encode_chat(tiny_llama, p) for p in given)


def test_bad_inputs_name_their_field(tiny_llama: ModelHandle) -> None:
    handle = tiny_llama
    train, validation, _ = _splits(handle, count=8)
    direction = _direction(handle)

    def field(**changes) -> str | None:  # type: ignore[no-untyped-def]
        arguments = {"train": train, "validation": validation, "direction": direction} | changes
        with pytest.raises(InvalidArgumentError) as raised:
            calibrate_gate(handle, HOOK, **arguments)
        return raised.value.field

    assert field(train=ContrastPrompts(fire=(), quiet=train.quiet)) == "train.fire"
    assert field(validation=ContrastPrompts(fire=validation.fire, quiet=())) == "validation.quiet"
    assert field(train=ContrastPrompts(fire=train.fire, quiet=("ok", ""))) == "train.quiet[1]"
    assert field(direction=torch.full((handle.d_model,), math.nan)) == "direction"
    assert field(direction=torch.zeros(handle.d_model)) == "direction"
    for target in (math.nan, math.inf, -0.1, 1.0, True):
        assert field(target_fpr=target) == "target_fpr"


def test_scores_at_several_hooks_in_one_pass_calibrate_as_each_hook_alone(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    train, validation, _ = _splits(handle, count=16)
    hooks = [HOOK, "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    scores = gate_scores(handle, hooks, _direction(handle), train=train, validation=validation)
    assert [s.hook for s in scores] == hooks
    for hook, score in zip(hooks, scores, strict=True):
        for target in (0.0, 0.25):
            alone = calibrate_gate(
                handle, hook, _direction(handle), train=train, validation=validation,
                target_fpr=target,
            )  # fmt: skip
            assert score.calibrate(target) == alone
            assert sum(score.fires("validation.fire", alone.threshold)) == round(
                alone.validation.true_positive_rate * alone.validation.fire_count
            )
    assert scores[0].read != scores[1].read  # the hooks are read apart
    with pytest.raises(InvalidArgumentError) as raised:
        gate_scores(handle, [HOOK, "blocks.99.hook_resid_pre"], _direction(handle),
                    train=train, validation=validation)  # fmt: skip
    assert raised.value.field == "hooks[1]"


def test_a_gated_report_from_two_evaluations_equals_running_the_gate(
    tiny_llama: ModelHandle,
) -> None:
    """Any threshold's figures follow from the unedited and the always-on evaluations: the rows
    the gate fires on run as always on, the others as unedited, rates by length and KL rows
    included."""
    handle = tiny_llama
    train, validation, projection = _splits(handle, count=24)
    score = gate_scores(handle, [HOOK], _direction(handle), train=train, validation=validation)[0]
    generator = torch.Generator().manual_seed(3)
    vector = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * 4)
    inner = Add(vector, 1.0, ("blocks.0.hook_resid_post",))
    positive = list(validation.fire)
    negative = list(validation.quiet)
    options = {
        "matcher": lambda text: "e" in text.lower(),
        "max_new_tokens": 6,
        "lengths": (2, 6),
        "kl_tokens": 3,
        "batch_size": 4,
    }
    unedited = evaluate_rate(handle, positive, negative, **options)
    always = evaluate_rate(handle, positive, negative, (inner,), **options)
    assert always.kl_first_token > 0 and [e["hit"] for e in always.examples] != [
        e["hit"] for e in unedited.examples
    ]
    everything = [projection[p] for p in (*positive, *negative)]
    # a threshold between two prompts (none sits on it), that fires on some of each side
    third = len(everything) // 3
    threshold = sum(sorted(everything)[third : third + 2]) / 2
    fire_positive = [projection[p] > threshold for p in positive]
    fire_negative = [projection[p] > threshold for p in negative]
    assert 0 < sum(fire_positive) + sum(fire_negative) < len(everything)
    gated = Gated(Condition(HOOK, _direction(handle), threshold), inner, GateScope.PROMPT)
    measured = evaluate_rate(handle, positive, negative, (gated,), **options)
    predicted = gated_report(unedited, always, fire_positive, fire_negative)
    assert [e["response"] for e in predicted.examples] == [e["response"] for e in measured.examples]
    assert predicted.rate == measured.rate and predicted.interval == measured.interval
    for mine, theirs in zip(predicted.by_length, measured.by_length, strict=True):
        assert (mine.tokens, mine.hits, mine.rate) == (theirs.tokens, theirs.hits, theirs.rate)
    for mine_row, their_row in zip(predicted.kl_rows, measured.kl_rows, strict=True):
        assert mine_row == pytest.approx(their_row, abs=1e-5)
    assert predicted.kl_first_token == pytest.approx(measured.kl_first_token, abs=1e-6)
    assert predicted.kl_multi_token == pytest.approx(measured.kl_multi_token, abs=1e-6)
    assert 0 < predicted.kl_first_token < always.kl_first_token
    assert score.fires("validation.quiet", threshold)[: len(negative)] == fire_negative
    with pytest.raises(InvalidArgumentError) as raised:
        gated_report(unedited, always, fire_positive[1:], fire_negative)
    assert raised.value.field == "fire"


def test_a_contrast_condition_is_the_train_mean_difference_at_each_layer(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    train, validation, _ = _splits(handle, count=16)
    # (at blocks.0.hook_resid_pre every chat prompt's last token is the same embedding: the
    # difference is 0 there, and a gate refuses it)
    hooks = ["blocks.2.hook_resid_pre", HOOK]
    condition = contrast_condition(handle, hooks, train)
    assert sorted(condition.layers) == [1, 2]
    for hook, layer in zip(hooks, (2, 1), strict=True):
        means = []
        for prompts in (train.fire, train.quiet):
            ids = [encode_chat(handle, p) for p in prompts]
            last = forward(handle, ids, hooks=[hook]).activations[hook]
            assert isinstance(last, torch.Tensor)
            means.append(last.mean(0))
        assert torch.allclose(condition.at(layer), means[0] - means[1], atol=1e-5)
    # its own train prompts project higher on the fire side, on average (by |difference|^2)
    score = gate_scores(handle, hooks, condition, train=train, validation=validation)[1]
    fire, quiet = score.read["train.fire"], score.read["train.quiet"]
    assert sum(fire) / len(fire) > sum(quiet) / len(quiet)
    for bad in ([], [HOOK, HOOK], ["blocks.9.hook_resid_pre"]):
        with pytest.raises(InvalidArgumentError) as raised:
            contrast_condition(handle, bad, train)
        assert raised.value.field is not None and raised.value.field.startswith("hooks")
    with pytest.raises(InvalidArgumentError) as raised:
        contrast_condition(handle, hooks, ContrastPrompts(fire=(), quiet=train.quiet))
    assert raised.value.field == "train.fire"


def _synthetic_reads(handle: ModelHandle, seed: int) -> PromptReads:
    """Two classes whose means differ a little along a quiet axis (e2) and more along a loud
    one (e1) where every prompt varies a lot: the mean difference points mostly along the loud
    axis, which hardly tells the classes apart; the quiet axis separates them."""
    generator = torch.Generator().manual_seed(seed)
    d = handle.d_model
    scale = torch.ones(d)
    scale[0] = 20.0
    shift = torch.zeros(d)
    shift[0], shift[1] = 2.0, 1.5

    def rows(n: int, fire: bool) -> torch.Tensor:
        noise = torch.randn(n, d, generator=generator) * scale * 0.3
        return noise + (shift if fire else 0.0)

    point = handle.resolver.parse(HOOK)
    read = {
        f"{split}.{side}": {point.name: rows(64, side == "fire")}
        for split in ("train", "validation")
        for side in ("fire", "quiet")
    }
    return PromptReads((point,), read)


def test_a_discriminant_condition_separates_what_the_mean_difference_cannot(
    tiny_llama: ModelHandle,
) -> None:
    reads = _synthetic_reads(tiny_llama, seed=3)
    auc = {}  # on validation: the share of (fire, quiet) pairs the projection orders right
    for discriminant in (False, True):
        condition = reads.condition(discriminant=discriminant)
        assert condition.layers == (1,)
        score = reads.scores(condition)[0]
        fire, quiet = score.read["validation.fire"], score.read["validation.quiet"]
        auc[discriminant] = sum(f > q for f in fire for q in quiet) / (len(fire) * len(quiet))
    assert auc[False] < 0.8 < 0.99 < auc[True]
    # along the mean difference, it has the mean difference's length
    fire, quiet = (reads.read[f"train.{side}"][reads.points[0].name] for side in ("fire", "quiet"))
    difference = fire.double().mean(0) - quiet.double().mean(0)
    vector = reads.condition(discriminant=True).at(1).double()
    unit = vector / vector.norm()
    assert float(vector @ unit) == pytest.approx(float(difference @ unit), rel=1e-5)


def test_reads_give_the_scores_and_conditions_of_the_one_call_functions(
    tiny_llama: ModelHandle,
) -> None:
    handle = tiny_llama
    train, validation, _ = _splits(handle, count=16)
    hooks = ["blocks.2.hook_resid_pre", HOOK]
    reads = read_prompts(handle, hooks, train=train, validation=validation)
    for discriminant in (False, True):
        condition = reads.condition(discriminant=discriminant)
        alone = contrast_condition(handle, hooks, train, discriminant=discriminant)
        for layer in (1, 2):
            assert torch.equal(condition.at(layer), alone.at(layer))
        scores = gate_scores(handle, hooks, condition, train=train, validation=validation)
        assert [s.read for s in reads.scores(condition)] == [s.read for s in scores]
    # a discriminant condition's own train prompts project higher on the fire side
    score = reads.scores(reads.condition(discriminant=True))[1]
    fire, quiet = score.read["train.fire"], score.read["train.quiet"]
    assert sum(fire) / len(fire) > sum(quiet) / len(quiet)
    train_only = read_prompts(handle, hooks, train=train)
    with pytest.raises(InvalidArgumentError) as raised:
        train_only.scores(_direction(handle))
    assert raised.value.field == "validation"
    tiny = ContrastPrompts(fire=train.fire[:1], quiet=train.quiet[:1])
    with pytest.raises(InvalidArgumentError) as raised:
        contrast_condition(handle, hooks, tiny, discriminant=True)
    assert raised.value.field == "train"


def test_each_condition_kind_gives_its_vector_and_scores(tiny_llama: ModelHandle) -> None:
    reads = _synthetic_reads(tiny_llama, seed=5)
    direction = _direction(tiny_llama)
    vector, scores = reads.gate("direction", direction)
    assert vector is direction and [s.read for s in scores] == [
        s.read for s in reads.scores(direction)
    ]
    vector, scores = reads.gate("contrast", direction)
    assert isinstance(vector, SteeringVector)
    assert torch.equal(vector.at(1), reads.condition().at(1))
    # the discriminant: fitted on three quarters of train, its threshold from the fourth
    fit, held = reads.split_train()
    hook = reads.points[0].name
    assert len(fit.read["train.fire"][hook]) == 48 and len(held.read["train.fire"][hook]) == 16
    assert torch.equal(held.read["train.quiet"][hook], reads.read["train.quiet"][hook][::4])
    assert held.read["validation.fire"] is reads.read["validation.fire"]
    vector, scores = reads.gate("discriminant", direction)
    assert isinstance(vector, SteeringVector)
    assert torch.equal(vector.at(1), fit.condition(discriminant=True).at(1))
    assert len(scores[0].read["train.quiet"]) == 16
    # calibrated on prompts it was not fitted on, its threshold holds on validation
    calibration = scores[0].calibrate(0.0)
    assert calibration.validation.false_positive_rate <= 0.1
    assert calibration.validation.true_positive_rate >= 0.9
    with pytest.raises(InvalidArgumentError) as raised:
        reads.gate("vibes", direction)
    assert raised.value.field == "condition"


def test_each_set_holds_the_target_on_every_quiet_set_apart() -> None:
    """GateScores.calibrate(each_set=True): the lowest threshold whose train false-positive
    rate is at most the target on each of the quiet prompts' sets apart, where many low
    "requests" would let a pooled threshold fire on half the few "situations"; one set gives the
    pooled threshold; sets that do not match the prompts are a clear error."""
    requests = [float(i) / 100 for i in range(90)]  # all under 1
    situations = [0.5 + i for i in range(10)]  # 0.5 .. 9.5
    read = {
        "train.fire": [20.0] * 4,
        "train.quiet": requests + situations,
        "validation.fire": [20.0],
        "validation.quiet": [0.0],
    }
    sets = ("requests",) * 90 + ("situations",) * 10
    scores = steer.calibration.GateScores("h", False, read, quiet_sets=sets)
    pooled = scores.calibrate(0.1)
    apart = scores.calibrate(0.1, each_set=True)
    assert pooled.threshold == sorted(requests + situations, reverse=True)[10]
    assert sum(s > pooled.threshold for s in situations) == 9  # the pooled 10% spent on them
    assert apart.threshold == sorted(situations, reverse=True)[1]
    assert sum(s > apart.threshold for s in situations) <= 1
    assert sum(r > apart.threshold for r in requests) == 0
    assert apart.train.false_positive_rate <= 0.1
    one = replace(scores, quiet_sets=("requests",) * 100)
    assert one.calibrate(0.1, each_set=True) == pooled
    assert replace(scores, quiet_sets=()).calibrate(0.1, each_set=True) == pooled
    with pytest.raises(InvalidArgumentError) as error:
        replace(scores, quiet_sets=sets[:50]).calibrate(0.1, each_set=True)
    assert error.value.field == "quiet_sets"


def test_the_quiet_sets_follow_their_prompts_into_the_discriminant_split(
    tiny_llama: ModelHandle,
) -> None:
    """PromptReads.quiet_sets reach every GateScores, and split_train (the discriminant's fit
    and calibration quarters) takes each quiet prompt's set and each prompt's form with it."""
    train, validation, _ = _splits(tiny_llama, 32)
    reads = read_prompts(tiny_llama, [HOOK], train=train, validation=validation)
    quiet = len(train.quiet)
    names = tuple(f"set{i % 3}" for i in range(quiet))
    sets = {"train.quiet": names, "validation.quiet": ("v",) * len(validation.quiet)}
    shapes = tuple(("message", "scene")[i % 2] for i in range(len(train.fire)))
    reads = replace(reads, quiet_sets=sets, forms={"train.fire": shapes})
    [score] = reads.scores(_direction(tiny_llama))
    assert score.quiet_sets == names
    fit, held = reads.split_train()
    folds = steer.calibration.FOLDS
    assert held.quiet_sets["train.quiet"] == names[::folds]
    assert fit.quiet_sets["train.quiet"] == tuple(n for i, n in enumerate(names) if i % folds)
    assert held.forms["train.fire"] == shapes[::folds]
    assert fit.forms["train.fire"] == tuple(f for i, f in enumerate(shapes) if i % folds)
    _, [discriminant] = reads.gate("discriminant", _direction(tiny_llama))
    assert discriminant.quiet_sets == names[::folds]
    assert len(discriminant.read["train.quiet"]) == len(names[::folds])
