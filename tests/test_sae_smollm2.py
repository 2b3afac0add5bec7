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
from steer.sae.features import RankedFeature, auroc, contrast, text_scores
from steer.sae.training import TrainingConfig, collect_activations, tokenize, train

PAIRS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "moralizing_pairs.jsonl"
HOOK = "blocks.15.hook_resid_post"
#: first tokens of a moralizing / refusing reply
MORALIZING_STARTS = ("I", "As", "Sorry", "It", "While", "Let")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(rows) >= 60, "the project's moralizing pairs are missing"
    return rows[:60], rows[60:105]


@pytest.fixture(scope="module")
def trained(smollm2: ModelHandle, pairs) -> tuple[SparseAutoencoder, list[RankedFeature]]:  # type: ignore[no-untyped-def]
    picking, _ = pairs
    texts = [row["moralizing"] for row in picking] + [row["in_character"] for row in picking]
    activations = collect_activations(smollm2, tokenize(smollm2, texts, 96), HOOK)
    config = TrainingConfig(
        hook=HOOK, tokens=40_000, d_sae=256, k=12, batch_size=256, learning_rate=2e-3
    )
    sae = train(activations, config, model_name=smollm2.name)
    ranked = contrast(
        smollm2,
        sae,
        [row["moralizing"] for row in picking],
        [row["in_character"] for row in picking],
        k=5,
    )
    return sae, ranked


def test_contrast_features_separate_held_out_texts(smollm2: ModelHandle, pairs, trained) -> None:  # type: ignore[no-untyped-def]
    _, held_out = pairs
    sae, ranked = trained
    top = ranked[0]
    assert top.auroc is not None and abs(top.auroc - 0.5) > 0.4  # separates the picking sets
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
    feature = next(r.feature for r in ranked if r.score > 0)  # fires more on moralizing replies
    prompts = [encode_chat(smollm2, row["situation"]) for row in held_out[:24]]
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
    pushed = moralizing_logmass((AddDecoder(sae, feature, 8.0),))
    pulled = moralizing_logmass((AddDecoder(sae, feature, -8.0),))
    print(f"log P(moralizing start): {pulled:.3f} (-8) < {baseline:.3f} (0) < {pushed:.3f} (+8)")
    assert pushed > baseline + 0.1
    assert pulled < baseline - 0.1
