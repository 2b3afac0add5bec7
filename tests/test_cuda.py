"""The engine on a GPU gives what it gives on CPU (skipped where torch sees no CUDA device; run on
a lent GPU machine, see docs/backends.md "On GPUs")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import ARCHITECTURES, tiny_handle

from steer import Ablate, Add, Condition, Gated, GateScope, SteeringVector
from steer.generation import Engine, GenerationRequest
from steer.models import ModelHandle
from steer.sampling import SamplingConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

HOOK = "blocks.1.hook_resid_post"


def _vector(handle: ModelHandle, seed: int, scale: float = 1.0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator) * scale)


def _requests(handle: ModelHandle) -> list[GenerationRequest]:
    """One batch: plain, Add, Ablate, both gate scopes, and seeded sampling with steering."""
    last = handle.num_layers - 1
    add = Add(_vector(handle, 3, 4.0), 1.0, (HOOK, f"blocks.{last}.hook_resid_post"))
    condition = Condition(HOOK, _vector(handle, 7), 0.0)
    base = GenerationRequest(
        sampling=SamplingConfig.greedy_config(), max_new_tokens=8, top_logprobs=5
    )
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, seed=11)
    return [
        replace(base, prompt="The quick brown fox"),
        replace(base, prompt="Write a short poem", interventions=(add,)),
        replace(base, prompt="The knight drew", interventions=(Ablate(_vector(handle, 2)),)),
        replace(
            base,
            prompt="How do I bake bread?",
            interventions=(Gated(condition, add, GateScope.PROMPT),),
        ),
        replace(
            base,
            prompt="Sure! Here is a story",
            interventions=(Gated(condition, add, GateScope.TOKEN),),
        ),
        replace(base, prompt="Once upon a time", sampling=sampled, interventions=(add,)),
    ]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_batch_on_the_gpu_gives_the_cpu_tokens(architecture: str) -> None:
    cpu = tiny_handle(architecture)
    gpu = tiny_handle(architecture)
    gpu.model.to("cuda")
    assert gpu.device.type == "cuda"
    requests = _requests(cpu)
    on_cpu = Engine(cpu, max_batch=8).run(requests)
    on_gpu = Engine(gpu, max_batch=8).run(requests)
    for ours, theirs in zip(on_gpu, on_cpu, strict=True):
        assert ours.finish_reason == theirs.finish_reason != "error"
        assert ours.token_ids == theirs.token_ids


def test_zero_strength_on_the_gpu_is_bit_identical_to_none() -> None:
    handle = tiny_handle("llama")
    handle.model.to("cuda", torch.bfloat16)
    request = GenerationRequest(
        prompt="The knight drew",
        sampling=SamplingConfig.greedy_config(),
        max_new_tokens=8,
        top_logprobs=5,
    )
    zero = replace(request, interventions=(Add(_vector(handle, 3), 0.0, (HOOK,)),))
    plain, steered = Engine(handle).generate([request]), Engine(handle).generate([zero])
    for a, b in zip(plain, steered, strict=True):
        assert a.token_ids == b.token_ids and a.top_logprobs == b.top_logprobs
