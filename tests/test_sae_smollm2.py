"""SAE features on the real SmolLM2-135M-Instruct: contrast search and a slider, measured.

A small TopK SAE is trained in the test (seconds) on the model's activations for the replies of
the project's moralizing/in-character pairs (recipes/data/moralizing_pairs.jsonl); nothing comes
from files produced outside the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer.activations import encode_chat, forward
from steer.models import ModelHandle
from steer.sae import AddDecoder, SparseAutoencoder
from steer.sae.features import RankedFeature, auroc, rank_contrast, scores_of, text_scores
from steer.sae.training import TrainingConfig, tokenize, train

PAIRS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "moralizing_pairs.jsonl"
HOOK = "blocks.15.hook_resid_post"
#: first tokens of a moralizing / refusing reply
MORALIZING_STARTS = ("I", "As", "Sorry", "It", "While", "Let")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(rows) >= 70, "the project's moralizing pairs are missing"
    return rows[:40], rows[40:70]


def _activations(handle: ModelHandle, texts: list[str]) -> list[torch.Tensor]:
    result = forward(handle, tokenize(handle, texts, 96), hooks=[HOOK], positions="all")
    rows = result.activations[HOOK]
    assert isinstance(rows, list)
    return rows


@pytest.fixture(scope="module")
def trained(smollm2: ModelHandle, pairs) -> tuple[SparseAutoencoder, list[RankedFeature]]:  # type: ignore[no-untyped-def]
    """Train on the picking replies, then rank features by contrast on the same activations."""
    picking, _ = pairs
    moralizing = _activations(smollm2, [row["moralizing"] for row in picking])
    in_character = _activations(smollm2, [row["in_character"] for row in picking])
    buffer = torch.cat([x[1:] for x in moralizing + in_character])  # first tokens left out
    config = TrainingConfig(
        hook=HOOK, tokens=20_000, d_sae=256, k=12, batch_size=256, learning_rate=3e-3
    )
    sae = train(buffer, config, model_name=smollm2.name)
    ranked = rank_contrast(scores_of(sae, moralizing), scores_of(sae, in_character), k=5)
    return sae, ranked


def test_contrast_features_separate_held_out_texts(smollm2: ModelHandle, pairs, trained) -> None:  # type: ignore[no-untyped-def]
    _, held_out = pairs
    sae, ranked = trained
    top = ranked[0]
    assert top.auroc is not None and abs(top.auroc - 0.5) > 0.4  # separates the picking sets
    # held-out texts go through the public path (forward + encode)
    scores_a = text_scores(smollm2, sae, [row["moralizing"] for row in held_out])
    scores_b = text_scores(smollm2, sae, [row["in_character"] for row in held_out])
    features = [r.feature for r in ranked]
    held = auroc(scores_a[:, features], scores_b[:, features])
    # oriented so that 1 means "ranks the set the feature was picked for first"
    oriented = [
        float(a) if r.score > 0 else 1 - float(a) for a, r in zip(held, ranked, strict=True)
    ]
    print("held-out AUROC of the top contrast features:", [round(a, 3) for a in oriented])
    assert oriented[0] > 0.85


def test_slider_on_moralizing_feature_moves_moralizing_starts(
    smollm2: ModelHandle, pairs, trained
) -> None:  # type: ignore[no-untyped-def]
    _, held_out = pairs
    sae, ranked = trained
    top = next(r for r in ranked if r.score > 0)  # fires more on moralizing replies
    feature = top.feature
    # push by twice what the feature reaches on a moralizing reply (its mean text score)
    strength = 2.0 * top.mean_activation
    prompts = [encode_chat(smollm2, row["situation"]) for row in held_out[:16]]
    tokens = sorted(
        {
            smollm2.tokenizer(word, add_special_tokens=False)["input_ids"][0]
            for word in MORALIZING_STARTS
        }
    )

    def moralizing_logmass(interventions: tuple) -> float:  # type: ignore[type-arg]
        logits = forward(smollm2, prompts, interventions=interventions, logits="last").logits
        assert isinstance(logits, torch.Tensor)
        return float(torch.logsumexp(torch.log_softmax(logits, -1)[:, tokens], -1).mean())

    baseline = moralizing_logmass(())
    half = moralizing_logmass((AddDecoder(sae, feature, strength / 2),))
    pushed = moralizing_logmass((AddDecoder(sae, feature, strength),))
    print(
        f"strength {strength:.1f}: log P(moralizing start) {baseline:.3f} (0) -> "
        f"{half:.3f} (half) -> {pushed:.3f} (full)"
    )
    # (a large negative strength is not a suppressor: it pushes the stream off-distribution)
    assert pushed > baseline + 0.1
    assert baseline < half < pushed


def test_auto_label_names_the_moralizing_feature(smollm2: ModelHandle, pairs, trained) -> None:  # type: ignore[no-untyped-def]
    """The labeller sees the feature's top snippets (from a corpus of both reply kinds) and
    answers with one short line; greedy, so the same label twice."""
    from steer.sae.features import auto_label, feature_info

    _, held_out = pairs
    sae, ranked = trained
    feature = next(r for r in ranked if r.score > 0).feature
    corpus = [row["moralizing"] for row in held_out[:12]] + [
        row["in_character"] for row in held_out[:12]
    ]
    info = feature_info(smollm2, sae, feature, corpus=corpus, num_snippets=4)
    assert len(info.top_snippets) == 4
    # the snippets it labels from are moralizing replies, where the feature was picked to fire
    moralizing = {row["moralizing"] for row in held_out[:12]}
    from_moralizing = sum(
        any(snippet.text.strip() and snippet.text.strip() in text for text in moralizing)
        for snippet in info.top_snippets
    )
    label = auto_label(smollm2, info, max_new_tokens=12)
    print(f"feature {feature}: label {label!r}; {from_moralizing}/4 snippets from moralizing")
    assert from_moralizing >= 3
    assert label and "\n" not in label and len(label.split()) <= 12
    assert auto_label(smollm2, info, max_new_tokens=12) == label
