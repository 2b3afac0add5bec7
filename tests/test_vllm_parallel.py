"""The vllm backend split over two tensor-parallel workers gives the hf engine's tokens.

Two CPU worker processes stand in for two GPUs: each holds half of every layer's heads and MLP
columns, and steer's steering, SAEs and gate reads reach both through ``collective_rpc`` (by
pickled bytes: vLLM's msgpack turns a dataclass into a dict across processes). One mixed batch
holds every kind of intervention that crosses that boundary.

These need the [vllm] extra; scripts/test.sh runs them in a pytest process of their own.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steer.activations import forward
from steer.backends.vllm import VllmEngine, VllmOptions, launch, start_vllm
from steer.errors import FailedPreconditionError
from steer.gates import Condition, Gated, GateScope
from steer.generation import Engine, GenerationRequest
from steer.interventions import Ablate, Add, Intervention
from steer.models import ModelHandle
from steer.sae.conditions import FeatureCondition
from steer.sae.loading import SparseAutoencoder
from steer.sae.sliders import Clamp, Scale
from steer.sampling import SamplingConfig
from steer.vectors import SteeringVector

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the [vllm] extra"),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores"),
]

PROMPTS = [
    "The knight drew her sword",
    "Write a short poem about the sea",
    "How do I bake bread at home?",
    "The dragon laughed and breathed fire",
    "Sure! Here is a story about a robot",
    "I'm sorry, but I can't help with that",
]
GATE_HOOK = "blocks.1.hook_resid_pre"


def _middle(handle: ModelHandle, direction: SteeringVector) -> float:
    """A threshold between the prompts' projections at the gate's hook: fires on half."""
    prompts = [handle.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    acts = forward(handle, prompts, hooks=(GATE_HOOK,)).activations[GATE_HOOK]
    probe = Condition(GATE_HOOK, direction, 0.0)
    (point,) = probe.points(handle.resolver)
    values = sorted((acts.float() @ probe.unit(point, handle.d_model)).tolist())
    return (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2


def _mixes(handle: ModelHandle) -> list[tuple[Intervention, ...]]:
    generator = torch.Generator().manual_seed(1)
    vector = SteeringVector(
        {layer: torch.randn(handle.d_model, generator=generator) for layer in range(4)}
    )
    direction = SteeringVector.from_shared(torch.randn(handle.d_model, generator=generator))
    torch.manual_seed(2)
    config = StandardSAEConfig(d_in=handle.d_model, d_sae=32)
    sae = SparseAutoencoder(StandardSAE(config), "blocks.2.hook_resid_post")
    middle = _middle(handle, direction)
    return [
        (),
        (Add(vector, 3.0),),
        (Ablate(direction, weight=2.0),),
        (Clamp(sae, 3, 20.0), Scale(sae, 5, 0.0)),
        (Gated(Condition(GATE_HOOK, direction, middle), Add(vector, 3.0), scope=GateScope.PROMPT),),
        (
            Gated(
                Condition(GATE_HOOK, direction, middle),
                Ablate(direction, layers=(1, 2, 3), weight=3.0),
            ),
        ),
        (
            Gated(
                Condition(GATE_HOOK, direction, middle),
                Add(vector, -3.0),
                scope=GateScope.REPLY,
                reply_tokens=3,
            ),
        ),
        (Gated(FeatureCondition(sae, 1, 0.0), Clamp(sae, 6, 20.0), scope=GateScope.PROMPT),),
    ]


def test_two_workers_equal_the_hf_engine() -> None:
    from tiny import VLLM_SIZES, tiny_handle

    handle = tiny_handle("llama", seed=4, **VLLM_SIZES)
    mixes = _mixes(handle)
    rows = len(PROMPTS)
    requests = [
        GenerationRequest(
            prompt=prompt,
            interventions=mix,
            sampling=SamplingConfig.greedy_config(),
            max_new_tokens=10,
        )
        for mix in mixes
        for prompt in PROMPTS
    ]
    # steer's logits processor inside the workers: a penalty range and DRY (vLLM has neither)
    rp = SamplingConfig(
        temperature=0.0,
        repetition_penalty=3.0,
        repetition_penalty_range=8,
        dry_multiplier=2.0,
        dry_allowed_length=1,
    )
    requests += [replace(request, sampling=rp) for request in requests[rows : 2 * rows]]
    options = VllmOptions(kv_cache_gib=1, tensor_parallel_size=2)
    engine = VllmEngine(handle, start_vllm(handle, max_batch=16, options=options), max_batch=16)
    try:
        got = engine.run(requests)
        assert (
            not engine.registry.saes and not engine.registry.users
        )  # every registration dropped, SAEs too
    finally:
        engine.close(final=True)
    expected = Engine(handle, max_batch=16).run(requests)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    penalised = expected[len(mixes) * rows :]
    plain = expected[rows : 2 * rows]
    assert any(p.token_ids != e.token_ids for p, e in zip(penalised, plain, strict=True))
    for mix in range(1, len(mixes)):
        changed = sum(
            expected[mix * rows + row].token_ids != expected[row].token_ids for row in range(rows)
        )
        assert changed > 0, mix  # every mix steers
    # the prompt gate fires on some rows only (the reply gate, reading replies, may fire on all)
    assert (
        sum(expected[4 * rows + row].token_ids != expected[row].token_ids for row in range(rows))
        < rows
    )


def test_cpu_workers_get_a_share_of_the_cores_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(launch, "_numa_nodes", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4})
    with launch.cpu_workers_bound(2):
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # for this start only
    with pytest.raises(FailedPreconditionError, match="a CPU core per worker"):
        launch.cpu_workers_bound(8).__enter__()
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "3|4")
    with launch.cpu_workers_bound(2):  # the user's binding stays
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "3|4"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(launch, "_numa_nodes", lambda: 2)
    with launch.cpu_workers_bound(2):  # a node per worker: vLLM's own binding
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_a_split_the_heads_do_not_allow_is_refused_before_vllm_starts() -> None:
    from tiny import VLLM_SIZES, tiny_handle

    handle = tiny_handle("llama", seed=4, **VLLM_SIZES)  # 2 heads
    with pytest.raises(FailedPreconditionError, match="must divide the model's 2 attention heads"):
        start_vllm(handle, options=VllmOptions(tensor_parallel_size=3))
