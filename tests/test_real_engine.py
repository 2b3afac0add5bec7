"""The engine on the real SmolLM2-135M-Instruct (from its PyPI package)."""

from __future__ import annotations

import pytest
import torch

from steer import Add, SteeringVector
from steer.activations import encode_chat, forward
from steer.generation import Engine, GenerationRequest, Message
from steer.models import ModelHandle
from steer.sampling import SamplingConfig

pytestmark = pytest.mark.slow

OCEAN = [
    "Tell me about the ocean.",
    "Describe waves crashing on the beach.",
    "What lives in the deep sea?",
    "Write about sailing across the sea.",
    "Why is the ocean salty?",
    "Describe a coral reef under the sea.",
]
ELSEWHERE = [
    "Tell me about the city.",
    "Describe traffic in the morning.",
    "What lives in the desert?",
    "Write about driving across the country.",
    "Why is the sky blue?",
    "Describe a busy office.",
]
LAYER = 12
HOOK = f"blocks.{LAYER}.hook_resid_pre"


def test_handle_facts(smollm2: ModelHandle) -> None:
    assert (smollm2.architecture, smollm2.num_layers, smollm2.d_model) == ("llama", 30, 576)
    assert smollm2.chat_template and "<|im_start|>" in smollm2.chat_template
    assert len(smollm2.weight_hash) == 64


def test_chat_output_is_coherent(smollm2: ModelHandle) -> None:
    question = GenerationRequest(
        messages=(Message("user", "What is the capital of France?"),),
        sampling=SamplingConfig.greedy_config(),
        max_new_tokens=20,
    )
    result = Engine(smollm2).run([question])[0]
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # ended by its own end-of-turn token


def test_a_contrast_direction_shifts_the_next_token_distribution(smollm2: ModelHandle) -> None:
    def mean_activation(prompts: list[str]) -> torch.Tensor:
        ids = [encode_chat(smollm2, p) for p in prompts]
        acts = forward(smollm2, ids, hooks=[HOOK]).activations[HOOK]
        assert isinstance(acts, torch.Tensor)
        return acts.mean(0)

    ocean = SteeringVector(per_layer={LAYER: mean_activation(OCEAN) - mean_activation(ELSEWHERE)})
    query = [encode_chat(smollm2, "Tell me a short story about your weekend.")]
    targets = [
        smollm2.tokenizer.encode(word, add_special_tokens=False)[0]
        for word in (" sea", " ocean", " waves", " beach")
    ]

    def next_token(strength: float) -> torch.Tensor:
        logits = forward(
            smollm2, query, logits="last", interventions=[Add(ocean, strength, (HOOK,))]
        )
        assert isinstance(logits.logits, torch.Tensor)
        return logits.logits[0].log_softmax(-1)

    base, toward, away = next_token(0.0), next_token(8.0), next_token(-8.0)
    kl = float((base.exp() * (base - toward)).sum())
    assert kl > 0.1
    assert toward[targets].exp().sum() > 2 * base[targets].exp().sum()
    assert away[targets].exp().sum() < base[targets].exp().sum()
