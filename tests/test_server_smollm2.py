"""The service on the real SmolLM2-135M-Instruct: a chat request with a slider made from the
model's own activations, streamed in compare mode, equals the in-process engine on both sides
(token for token, greedy) and the steered side differs from the default one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from steer.activations import encode_chat, forward
from steer.artifacts import save_vector
from steer.client import SteerClient, add
from steer.generation import Engine, GenerationRequest, Message
from steer.interventions import Add
from steer.models import ModelHandle
from steer.sampling import SamplingConfig
from steer.server import ServerSettings, SteerServer
from steer.vectors import SteeringVector

pytestmark = pytest.mark.slow

HOOK = "blocks.12.hook_resid_post"
OCEAN = [
    "Tell me about the ocean waves.",
    "Describe the sea at night.",
    "What lives in the deep sea?",
]
DESERT = [
    "Tell me about the desert sand.",
    "Describe the dunes at noon.",
    "What lives in the Sahara?",
]
QUESTION = "Describe a place you would like to visit."


@pytest.fixture(scope="module")
def served(smollm2: ModelHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SteerServer]:
    root: Path = tmp_path_factory.mktemp("smollm2")
    layer_acts = {}
    for name, prompts in (("ocean", OCEAN), ("desert", DESERT)):
        ids = [encode_chat(smollm2, p) for p in prompts]
        activations = forward(smollm2, ids, hooks=[HOOK]).activations[HOOK]
        assert isinstance(activations, torch.Tensor)
        layer_acts[name] = activations.reshape(len(prompts), -1).mean(0)  # last token
    vector = SteeringVector(per_layer={12: layer_acts["ocean"] - layer_acts["desert"]})
    save_vector(root / "artifacts" / "ocean", vector, handle=smollm2, hooks=[HOOK], kind="vector")
    settings = ServerSettings(port=0, models_root=root, max_batch=8)
    with SteerServer(settings, models={"smollm2": smollm2}) as server:
        yield server


def test_compare_mode_on_smollm2_equals_in_process(
    served: SteerServer, smollm2: ModelHandle
) -> None:
    with SteerClient(served.target, timeout=300) as client:
        info = client.model_info()
        assert (info.num_layers, info.d_model, info.architecture) == (30, 576, "llama")
        sides = client.complete(
            messages=[{"role": "user", "content": QUESTION}],
            interventions=[add("ocean", 4.0)],
            compare=True,
            temperature=0,
            max_new_tokens=24,
        )
    from steer.artifacts import load_vector

    vector = load_vector(served.settings.artifacts_dir / "ocean", handle=smollm2).vector
    base = GenerationRequest(
        messages=(Message("user", QUESTION),),
        sampling=SamplingConfig(temperature=0.0),
        max_new_tokens=24,
    )
    steered_request = GenerationRequest(
        messages=base.messages,
        sampling=base.sampling,
        max_new_tokens=24,
        interventions=(Add(vector, 4.0, hooks=(HOOK,)),),
    )
    plain, steered = Engine(smollm2).run([base, steered_request])
    assert tuple(sides["default"].token_ids) == plain.token_ids
    assert tuple(sides["steered"].token_ids) == steered.token_ids
    assert sides["default"].text != sides["steered"].text
