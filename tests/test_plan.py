"""Intervention plans: each request's interventions lowered once, hooks given their phase per pass.

A plan's hooks take the phase and speakers of their forward pass instead of reading state the
engine mutates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from steer.client import SteerClient, add
from steer.generation import Engine, GenerationRequest
from steer.hooks import HookPoint, HookResolver
from steer.interventions import Add, Op, Phase
from steer.models import ModelHandle
from steer.plan import build_plan
from steer.sampling import SamplingConfig
from steer.server import ServerSettings, SteerServer
from steer.vectors import SteeringVector

GREEDY = SamplingConfig(temperature=0.0)
HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["The quick brown fox", "How do I bake bread", "The knight drew her sword", "Sure!"]


@dataclass(frozen=True, eq=False)
class _Counted(Add):
    """An addition that counts how often it is lowered."""

    calls: list[int] = field(default_factory=list)

    def lower(self, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        self.calls.append(1)
        return super().lower(resolver, d_model)


def _vector(handle: ModelHandle, seed: int) -> SteeringVector:
    return SteeringVector(
        shared=torch.randn(handle.d_model, generator=torch.Generator().manual_seed(seed))
    )


def test_each_request_is_lowered_once_through_admissions_and_replans(
    tiny_llama: ModelHandle,
) -> None:
    counted = [_Counted(_vector(tiny_llama, i), 0.5, hooks=(HOOK,)) for i in range(4)]
    # two rows at a time and different lengths: rows leave and join, so the batch is replanned
    requests = [
        GenerationRequest(
            prompt=prompt, sampling=GREEDY, max_new_tokens=3 + 2 * i, interventions=(counted[i],)
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    results = Engine(tiny_llama, max_batch=2).run(requests)
    assert [len(c.calls) for c in counted] == [1, 1, 1, 1]
    # and the cached ops steer exactly as freshly lowered ones do
    fresh = [
        GenerationRequest(
            prompt=prompt,
            sampling=GREEDY,
            max_new_tokens=3 + 2 * i,
            interventions=(Add(_vector(tiny_llama, i), 0.5, hooks=(HOOK,)),),
        )
        for i, prompt in enumerate(PROMPTS)
    ]
    assert [r.token_ids for r in results] == [r.token_ids for r in Engine(tiny_llama).run(fresh)]


@pytest.fixture
def served(tiny_llama: ModelHandle, tmp_path: Path) -> Iterator[SteerServer]:
    settings = ServerSettings(port=0, models_root=tmp_path, max_batch=4, shutdown_grace=2.0)
    with SteerServer(settings, models={"tiny": tiny_llama}) as server:
        yield server


def test_a_served_request_is_lowered_once(
    served: SteerServer, tiny_llama: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service converts (and checks) the intervention, the scheduler and the engine queue
    it, the engine plans its batch: one lowering in all."""
    calls: list[int] = []
    lower = Add.lower

    def counting(self: Add, resolver: HookResolver, d_model: int) -> list[tuple[HookPoint, Op]]:
        calls.append(1)
        return lower(self, resolver, d_model)

    monkeypatch.setattr(Add, "lower", counting)
    vector = [float(x) for x in _vector(tiny_llama, 0).shared.tolist()]  # type: ignore[union-attr]
    with SteerClient(served.target, timeout=60) as client:
        completion = client.complete(
            PROMPTS[0],
            model="tiny",
            interventions=[add(vector, 0.5, hooks=[HOOK])],
            temperature=0.0,
            max_new_tokens=4,
        )[None]
    assert completion.token_ids and len(calls) == 1


def test_a_plans_hooks_take_the_phase_of_their_pass(tiny_llama: ModelHandle) -> None:
    """One plan, hooks for two passes at once: each applies its own phase's additions."""
    vector = _vector(tiny_llama, 3)
    plan = build_plan(
        [(Add(vector, 1.0, hooks=(HOOK,), phase=Phase.GENERATED),)],
        tiny_llama.resolver,
        tiny_llama.d_model,
        tiny_llama.dtype,
        tiny_llama.device,
    )
    point = tiny_llama.resolver.parse(HOOK)
    prompt_hook = plan.hooks(Phase.PROMPT)[point]
    generated_hook = plan.hooks(Phase.GENERATED)[point]
    x = torch.randn(1, 3, tiny_llama.d_model)
    assert torch.equal(prompt_hook(x), x)
    torch.testing.assert_close(generated_hook(x), x + vector.shared)
    assert torch.equal(prompt_hook(x), x)  # making the second set of hooks changed nothing
