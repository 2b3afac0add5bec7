"""steer.directions.gate_styles: a gate's rates on a style of prompt it was not fitted on."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from steer.calibration import CONDITIONS, PromptReads, summed_scores
from steer.directions.gate_styles import (
    _fold,
    held_out_styles,
    new_source_levels,
    new_source_rates,
    train_level,
)
from steer.errors import InvalidArgumentError
from steer.models import ModelHandle

HOOK = "blocks.1.hook_resid_post"


def _reads(handle: ModelHandle) -> tuple[PromptReads, dict[str, list[str]], torch.Tensor]:
    """Fire prompts 3 above quiet ones along e0; style "b" sits 5 higher on both sides, style
    "a" and the unlabelled prompts not at all."""
    generator = torch.Generator().manual_seed(0)
    d = handle.d_model
    axis = torch.zeros(d)
    axis[0] = 1.0
    read: dict[str, dict[str, torch.Tensor]] = {}
    labels: dict[str, list[str]] = {}
    for split in ("train", "validation"):
        for side in ("fire", "quiet"):
            styles = ["", "a", "b"] * 20
            shift = torch.tensor(
                [(3.0 if side == "fire" else 0.0) + 5.0 * (s == "b") for s in styles]
            )
            rows = torch.randn(len(styles), d, generator=generator) * 0.3 + shift[:, None] * axis
            read[f"{split}.{side}"] = {HOOK: rows}
            labels[f"{split}.{side}"] = styles
    return PromptReads((handle.resolver.parse(HOOK),), read), labels, axis


def test_a_style_held_out_is_never_in_the_fit_and_its_shift_shows(tiny_llama: ModelHandle) -> None:
    reads, labels, axis = _reads(tiny_llama)
    same_style = reads.scores(axis)[0].calibrate(0.02).validation
    assert same_style.false_positive_rate <= 0.05
    [rates] = held_out_styles(reads, labels, "direction", axis, target_fpr=0.02)
    assert rates.hook == HOOK and (rates.fire_count, rates.quiet_count) == (80, 80)
    # fitted without "b", the threshold sits under b's quiet prompts: every one fires; fitted
    # with b's raised quiet prompts in the calibration, the threshold sits over a's fire prompts
    assert rates.by_style["b"] == (1.0, 1.0)
    assert rates.by_style["a"][0] <= 0.1
    assert rates.false_positive_rate == pytest.approx(0.5, abs=0.05)
    for condition in ("contrast", "discriminant"):
        [other] = held_out_styles(reads, labels, condition, axis, target_fpr=0.02)
        assert other.by_style["b"][1] == 1.0


def test_style_labels_are_checked(tiny_llama: ModelHandle) -> None:
    reads, labels, axis = _reads(tiny_llama)
    short = {**labels, "train.fire": labels["train.fire"][:-1]}
    one = {key: ["a" if s else "" for s in styles] for key, styles in labels.items()}
    for bad, field in ((short, "labels.train.fire"), (one, "labels")):
        with pytest.raises(InvalidArgumentError) as raised:
            held_out_styles(reads, bad, "direction", axis)
        assert raised.value.field == field


def test_folds_carry_each_prompts_form_and_quiet_set(tiny_llama: ModelHandle) -> None:
    """gate_reads labels every prompt's form (for every recipe) and each quiet prompt's set; a
    fold takes each label with its prompt, so the held-out rates are those of the same reads
    unlabelled, for every condition (the discriminant splits its train part with the labels:
    misaligned ones raised there)."""
    reads, labels, axis = _reads(tiny_llama)
    forms = {key: tuple(styles) for key, styles in labels.items()}
    sets = {key: forms[key] for key in ("train.quiet", "validation.quiet")}
    labelled = replace(reads, forms=forms, quiet_sets=sets)
    for condition in CONDITIONS:
        expected = held_out_styles(reads, labels, condition, axis, target_fpr=0.02)
        assert held_out_styles(labelled, labels, condition, axis, target_fpr=0.02) == expected
    held = {key: torch.tensor([style == "b" for style in styles]) for key, styles in labels.items()}
    fold = _fold(labelled, held)
    for key, rows in fold.read.items():
        assert len(fold.forms[key]) == len(rows[HOOK])
        assert set(fold.forms[key]) == ({"b"} if key.startswith("validation") else {"", "a"})
    assert fold.quiet_sets == {key: fold.forms[key] for key in sets}


def test_the_summed_gate_held_out_is_fitted_on_the_fold_alone(tiny_llama: ModelHandle) -> None:
    """With ``summed``, each hook's rates are as without it, and one more entry: the summed gate
    (steer.calibration.summed_scores) fitted, weighted and calibrated on the other styles'
    prompts only, read on the held-out style's (built here from the public pieces)."""
    reads, labels, axis = _reads(tiny_llama)
    both = _two_hooks(tiny_llama, reads)
    second, read = both.points[1], both.read
    alone = held_out_styles(both, labels, "direction", axis, target_fpr=0.02)
    *hooks, summed = held_out_styles(both, labels, "direction", axis, target_fpr=0.02, summed=True)
    assert hooks == alone and summed.hook == (HOOK, second.name)
    for style in ("a", "b"):
        _, scores = PromptReads(both.points, _by_hand(read, labels, style)).gate("direction", axis)
        rates = summed_scores(scores).calibrate(0.02).validation
        assert summed.by_style[style] == (rates.true_positive_rate, rates.false_positive_rate)


def test_a_kept_gates_new_source_rates_are_its_own_candidates(tiny_llama: ModelHandle) -> None:
    """new_source_rates (what scripts/eval_gated.py reports for the gate it keeps): the
    held-out rates of the kept hook's gate, or of the summed gate, as held_out_styles gives
    them; None without labels."""
    reads, labels, axis = _reads(tiny_llama)
    both = _two_hooks(tiny_llama, reads)
    *hooks, summed = held_out_styles(both, labels, "direction", axis, target_fpr=0.02, summed=True)
    scores = both.scores(axis)
    for score, expected in ((scores[1], hooks[1]), (summed_scores(scores), summed)):
        kept = score.calibrate(0.02)
        assert new_source_rates(both, labels, "direction", axis, kept) == expected
        assert new_source_rates(both, None, "direction", axis, kept) is None


def test_the_new_source_level_is_the_lowest_that_keeps_new_sources_to_the_target(
    tiny_llama: ModelHandle,
) -> None:
    """new_source_levels: each style scored by the gate fitted without it, in standard
    deviations of that fit's quiet train scores; the level is the lowest at which the held-out
    quiet prompts, pooled, fire at most at the target (any lower one fires on more), and the
    rates are those at it. Calibrated on train instead, the same gates fire on half of them."""
    reads, labels, axis = _reads(tiny_llama)
    target = 0.1
    [rates] = new_source_levels(reads, labels, "direction", axis, target_fpr=target)
    scored = _standardized(reads, labels, axis)
    quiet = [p for sides in scored.values() for p in sides["quiet"]]
    assert rates.level is not None
    assert sum(q > rates.level for q in quiet) <= target * len(quiet)
    assert sum(q >= rates.level for q in quiet) > target * len(quiet)
    assert rates.false_positive_rate == sum(q > rates.level for q in quiet) / len(quiet)
    for style, sides in scored.items():
        fired = [sum(p > rates.level for p in sides[s]) / len(sides[s]) for s in ("fire", "quiet")]
        assert rates.by_style[style] == tuple(fired)
    [trained] = held_out_styles(reads, labels, "direction", axis, target_fpr=target)
    assert trained.level is None and trained.false_positive_rate > 0.4


def test_a_new_source_level_is_never_below_the_train_threshold_and_its_rates_are_there(
    tiny_llama: ModelHandle,
) -> None:
    """new_source_levels with ``floors`` (where each candidate's train threshold stands,
    train_level): a floor under the new-source level changes nothing; one above it becomes the
    level, and the rates are read there (the threshold the gate keeps), not at the lower one."""
    reads, labels, axis = _reads(tiny_llama)
    options = {"target_fpr": 0.1}
    [free] = new_source_levels(reads, labels, "direction", axis, **options)
    assert free.level is not None
    [low] = new_source_levels(reads, labels, "direction", axis, **options, floors=[free.level - 9])
    assert low == free
    floor = free.level + 0.5
    [high] = new_source_levels(reads, labels, "direction", axis, **options, floors=[floor])
    assert high.level == floor
    scored = _standardized(reads, labels, axis)
    for side, rate in (("fire", high.true_positive_rate), ("quiet", high.false_positive_rate)):
        pooled = [p for sides in scored.values() for p in sides[side]]
        assert rate == sum(p > floor for p in pooled) / len(pooled)
    assert high.false_positive_rate < free.false_positive_rate
    [score] = reads.scores(axis)
    mean, spread = score.spread()
    trained = score.calibrate(0.1).threshold
    assert train_level(score, 0.1) == pytest.approx((trained - mean) / spread)


def test_each_fold_calibrates_on_its_own_quiet_sets_apart(tiny_llama: ModelHandle) -> None:
    """held_out_styles(each_set=True): each fold's gate keeps the target on each of its quiet
    sets apart, the sets folded with their prompts (by hand: the fold's quiet train prompts and
    their sets, outside the held style, train then validation)."""
    reads, labels, axis = _reads(tiny_llama)
    sets = {key: tuple(f"set{i % 2}" for i in range(len(labels[key])))
            for key in ("train.quiet", "validation.quiet")}  # fmt: skip
    reads = replace(reads, quiet_sets=sets)
    [apart] = held_out_styles(reads, labels, "direction", axis, target_fpr=0.1, each_set=True)
    for style in ("a", "b"):
        fold_sets = tuple(
            name
            for key in ("train.quiet", "validation.quiet")
            for name, label in zip(sets[key], labels[key], strict=True)
            if label != style
        )
        fold = PromptReads(reads.points, _by_hand(reads.read, labels, style), quiet_sets={})
        [score] = replace(fold, quiet_sets={"train.quiet": fold_sets}).scores(axis)
        expected = score.calibrate(0.1, each_set=True).validation
        assert apart.by_style[style] == (expected.true_positive_rate, expected.false_positive_rate)


def _standardized(
    reads: PromptReads, labels: dict[str, list[str]], axis: torch.Tensor
) -> dict[str, dict[str, list[float]]]:
    """Each style's validation scores by the gate fitted without it, by hand, in standard
    deviations above the mean of that fit's quiet train scores."""
    scored = {}
    for style in ("a", "b"):
        [score] = PromptReads(reads.points, _by_hand(reads.read, labels, style)).scores(axis)
        mean, spread = score.spread()
        scored[style] = {
            side: [(p - mean) / spread for p in score.read[f"validation.{side}"]]
            for side in ("fire", "quiet")
        }
    return scored


def _two_hooks(handle: ModelHandle, reads: PromptReads) -> PromptReads:
    """``reads`` and a second hook: twice the first's rows plus noise."""
    second = handle.resolver.parse("blocks.2.hook_resid_post")
    generator = torch.Generator().manual_seed(1)
    read = {
        key: {
            **rows,
            second.name: rows[HOOK] * 2.0 + torch.randn(rows[HOOK].shape, generator=generator),
        }
        for key, rows in reads.read.items()
    }
    return PromptReads((*reads.points, second), read)


def _by_hand(
    read: dict[str, dict[str, torch.Tensor]], labels: dict[str, list[str]], style: str
) -> dict[str, dict[str, torch.Tensor]]:
    """The fold that holds ``style`` out, built from the reads by hand: train, every train and
    validation prompt of the other styles; validation, the style's own."""
    fold: dict[str, dict[str, torch.Tensor]] = {}
    for side in ("fire", "quiet"):
        for part, keep in (("train", False), ("validation", True)):
            fold[f"{part}.{side}"] = {
                hook: torch.cat([
                    read[f"{split}.{side}"][hook][
                        torch.tensor([(s == style) == keep for s in labels[f"{split}.{side}"]])
                    ]
                    for split in ("train", "validation")
                ])
                for hook in read["train.fire"]
            }  # fmt: skip
    return fold
