"""steer.directions.gate_styles: a gate's rates on a style of prompt it was not fitted on."""

from __future__ import annotations

import pytest
import torch

from steer.calibration import PromptReads, summed_scores
from steer.directions.gate_styles import held_out_styles
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


def test_the_summed_gate_held_out_is_fitted_on_the_fold_alone(tiny_llama: ModelHandle) -> None:
    """With ``summed``, each hook's rates are as without it, and one more entry: the summed gate
    (steer.calibration.summed_scores) fitted, weighted and calibrated on the other styles'
    prompts only, read on the held-out style's (built here from the public pieces)."""
    reads, labels, axis = _reads(tiny_llama)
    second = tiny_llama.resolver.parse("blocks.2.hook_resid_post")
    generator = torch.Generator().manual_seed(1)
    read = {
        key: {
            **rows,
            second.name: rows[HOOK] * 2.0 + torch.randn(rows[HOOK].shape, generator=generator),
        }
        for key, rows in reads.read.items()
    }
    both = PromptReads((*reads.points, second), read)
    alone = held_out_styles(both, labels, "direction", axis, target_fpr=0.02)
    *hooks, summed = held_out_styles(both, labels, "direction", axis, target_fpr=0.02, summed=True)
    assert hooks == alone and summed.hook == (HOOK, second.name)
    for style in ("a", "b"):
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
                    for hook in (HOOK, second.name)
                }  # fmt: skip
        _, scores = PromptReads(both.points, fold).gate("direction", axis)
        rates = summed_scores(scores).calibrate(0.02).validation
        assert summed.by_style[style] == (rates.true_positive_rate, rates.false_positive_rate)
